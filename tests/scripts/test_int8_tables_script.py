"""bench/int8_tables.py end to end on a tiny trained scorer: the int8 copy keeps the rows' order, both
scorers score the test split (through serving and through the training's batched predict), and the figures
are consistent."""
from pathlib import Path

import pytest

from bench import int8_tables
from engine import cli

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


@pytest.mark.slow  # trains a tiny scorer, then runs the script end to end
def test_int8_tables_bench_on_a_tiny_scorer(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--train-examples", "100",
              "--val-examples", "30", "--test-examples", "40", "--device", "cpu"])
    capsys.readouterr()
    results = tmp_path / "RESULTS.md"
    figures = int8_tables.main(["--scorer", str(out / "scorer"), "--data", str(FIXTURE), "--limit", "60", "--gather-rows", "2000",
                    "--reps", "2", "--results-md", str(results)])
    dim = 64  # the tiny llama's hidden size
    assert figures["bytes_per_row"] == {"fp32": 4 * dim, "int8": dim + 4}
    assert 0 < figures["max_diff"] < 0.05 and abs(figures["int8_minus_fp32"]) < 0.05
    assert figures["auc"]["int8"] == pytest.approx(figures["auc"]["fp32"] + figures["int8_minus_fp32"], abs=1e-9)
    text = results.read_text()
    assert "<!-- bench:int8-tables -->" in text and "| int8 | 68 |" in text and "(serving path, " in text
    # the same comparison through the training's batched predict (BAHECTR over the int8 copy)
    batched = int8_tables.main(["--scorer", str(out / "scorer"), "--data", str(FIXTURE), "--path", "timeline",
                                "--limit", "60", "--gather-rows", "2000", "--reps", "2", "--results-md", str(results)])
    assert 0 < batched["max_diff"] < 0.05 and abs(batched["int8_minus_fp32"]) < 0.05
    assert batched["auc"]["int8"] == pytest.approx(batched["auc"]["fp32"] + batched["int8_minus_fp32"], abs=1e-9)
    assert "(training's batched predict, movielens_tiny.parquet time split)" in results.read_text()
