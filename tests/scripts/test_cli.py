"""The `bahe` command line: encode (build, then append), train on a log file, score, info."""
import json
from pathlib import Path

import pytest

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


def test_train_reads_a_movielens_1m_folder_and_refuses_a_catalog_for_it(tiny_checkpoints, tmp_path, capsys):
    """`bahe train --data` takes what its help names: a folder of MovieLens-1M's .dat files (as 'ml1m' reads the
    packaged one), not only log files; --catalog / --timestamps for a packaged data set stop with one line."""
    from tests.ml1m_fixture import write_ml1m_files
    folder = write_ml1m_files(tmp_path / "ml-1m")
    out = tmp_path / "run"
    cli.main(["train", "--data", str(folder), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--train-examples", "60",
              "--val-examples", "20", "--test-examples", "30", "--device", "cpu"])
    assert "test AUC" in capsys.readouterr().out and (out / "scorer" / "scorer.json").is_file()
    with pytest.raises(SystemExit, match="'ml1m' is a packaged data set"):
        cli.main(["train", "--data", "ml1m", "--catalog", "items.csv", "--out", str(tmp_path / "x")])


def test_train_with_one_seed_makes_one_scorer_whatever_ran_before(tiny_checkpoints, tmp_path):
    """--seed fixes the new weights as well as the data order: two runs, the global RNG moved in between, save
    byte-equal models."""
    import hashlib

    import torch
    models = []
    for run in ("a", "b"):
        torch.rand(7)  # whatever the process did before
        out = tmp_path / run
        cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
                  "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--train-examples", "60",
                  "--val-examples", "20", "--test-examples", "20", "--device", "cpu", "--seed", "3"])
        models.append(hashlib.sha256(b"".join(p.read_bytes() for p in sorted((out / "scorer").glob("*.safetensors"))))
                      .hexdigest())
    assert models[0] == models[1]
