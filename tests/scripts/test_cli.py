"""The `bahe` command line: encode (build, then append), train on a log file, score, info."""
import json
from pathlib import Path

from engine import cli

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


def test_encode_builds_then_appends(tiny_checkpoints, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("bought latte\nsearched shoes\nbought latte\n")
    table = tmp_path / "t.safetensors"
    args = ["encode", str(texts), "--model", str(tiny_checkpoints["qwen2"]), "--lower-layers", "2", "--out", str(table)]
    cli.main(args)
    assert "3 texts -> 2 unique rows" in capsys.readouterr().out
    texts.write_text("bought latte\nwatched movie\n")
    cli.main(args)
    assert "appended 1 new rows" in capsys.readouterr().out
    cli.main(["info", str(table), "--verify"])
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 3 and info["num_lower_layers"] == "2" and info["family"] == "qwen2"


def test_encode_row_dtype_int8_builds_and_appends_an_int8_table(tiny_checkpoints, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("bought latte\nsearched shoes\n")
    table = tmp_path / "t.safetensors"
    args = ["encode", str(texts), "--model", str(tiny_checkpoints["qwen2"]), "--lower-layers", "2", "--out", str(table),
            "--row-dtype", "int8"]
    cli.main(args)
    assert "2 unique rows, dim 64, int8" in capsys.readouterr().out
    texts.write_text("bought latte\nwatched movie\n")
    cli.main(args)
    assert "appended 1 new rows" in capsys.readouterr().out
    cli.main(["info", str(table), "--verify"])
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 3 and info["dtype"] == "int8" and info["bytes_per_row"] == 64 + 4


def test_train_then_score(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--train-examples", "100",
              "--val-examples", "30", "--test-examples", "40", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "test AUC" in printed and (out / "scorer" / "scorer.json").is_file()
    request = {"user": {"liked": ["Toy Story (1995) | Animation, Children's, Comedy"], "watched": []},
               "item": "Heat (1995) | Action, Crime, Thriller"}
    requests = tmp_path / "users.jsonl"
    requests.write_text(json.dumps(request) + "\n" + json.dumps({**request, "user": {}}) + "\n")
    cli.main(["score", "--scorer", str(out / "scorer"), "--input", str(requests), "--device", "cpu"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(0 < x["p_click"] < 1 for x in lines)


def test_train_and_fold_flags_make_one_train_config(tmp_path):
    """`bahe train` and `bahe features --folds` read their optimization flags through one train_config;
    --lr-decay reaches it (off by default)."""
    from engine.training.loops.train_commands import train_config
    parser = cli.build_parser()
    train = parser.parse_args(["train", "--out", str(tmp_path), "--epochs", "2", "--lr", "0.002", "--lr-decay"])
    features = parser.parse_args(["features", "--data", "log.csv", "--out", "f.parquet", "--folds", "3"])
    got, default = train_config(train), train_config(features)
    assert (got.epochs, got.lr, got.lr_decay) == (2, 0.002, True)
    assert default.lr_decay is False and default.epochs == 2 and default.backbone_lr == 5e-5
