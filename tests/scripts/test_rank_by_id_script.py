"""bench/rank_by_id.py end to end on a tiny checkpoint and the MovieLens fixture: the by-id scores equal the text
path's, every path is timed, the goal line is computed from the figures, and the results section is written."""
from pathlib import Path

import numpy as np
import pytest

from bench import rank_by_id

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


@pytest.mark.slow  # builds tables and runs the script end to end
def test_rank_by_id_bench_on_a_tiny_checkpoint(tiny_checkpoints, tmp_path):
    results = tmp_path / "RESULTS.md"
    out = rank_by_id.main(["--model", str(tiny_checkpoints["llama"]), "--data", str(FIXTURE), "--lower-layers", "2",
                           "--m", "8", "--k", "12", "--repeats", "3", "--threads", "1", "--work-dir",
                           str(tmp_path / "work"), "--results", str(results)])
    assert out["diff"] < 1e-5 and out["upper"] == 2
    assert {name: a.shape for name, a in out["ranks"].items()} == {"text": (3, 3), "text_lru": (3, 3), "by_id": (3, 3)}
    assert all(a.shape == (3, 2) and (a > 0).all() for a in out["appends"].values())
    assert (out["ranks"]["text"][:, 2] > 0).all() and (out["ranks"]["by_id"][:, 2] == 0).all()  # lookup shares
    text = results.read_text()
    assert "<!-- bench:rank_by_id:" in text and "| rank by ids, user state kept |" in text
    lines = rank_by_id.table(out)
    cpu = next(line for line in lines if line.startswith("- Goal on CPU"))
    warm, by_id = (float(np.percentile(out["ranks"][k][:, 1], 50)) for k in ("text_lru", "by_id"))
    bound = warm * (1 - float(np.percentile(out["ranks"]["text_lru"][:, 2], 50)))
    assert (", met;" in cpu) == (by_id <= bound) and f"{by_id:.2f} ms vs {bound:.2f} ms" in cpu
