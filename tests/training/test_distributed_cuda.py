"""The NCCL path of `--distributed` on a GPU: one torchrun rank on cuda:0 joins a "cpu:gloo,cuda:nccl" group,
encodes a table equal to the single-process CPU build, and trains and saves a scorer through DDP over NCCL.
One GPU allows one rank only (NCCL refuses two ranks on one device), so equality across ranks is checked on the
CPU (tests/encoding/test_abe_sharded.py, tests/training/test_data_parallel.py); skipped without CUDA."""
import numpy as np
import pytest
import torch

from engine.encoding.abe import AtomicEncoder
from engine.serving.scorer import BAHEScorer
from tests.multiprocess import ROOT, torchrun
from tests.encoding.test_abe_sharded import TEXTS
from weights.checkpoint import Checkpoint
from weights.table import BehaviorTable

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FIXTURE = ROOT / "tests" / "fixtures" / "movielens_tiny.parquet"


def test_encode_on_one_cuda_rank_equals_the_cpu_build(tiny_checkpoints, tmp_path):
    model = str(tiny_checkpoints["bert"])
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "cuda.safetensors"
    done = torchrun(1, ["engine.cli", "encode", str(texts), "--model", model, "--lower-layers", "2", "--out", str(out),
                        "--distributed"], CUDA_VISIBLE_DEVICES="0", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    encoder = AtomicEncoder.from_checkpoint(Checkpoint(model), 2, progress=False)
    single = BehaviorTable.build(tmp_path / "cpu.safetensors", TEXTS, encoder)
    table = BehaviorTable.open(out, encoder, verify=True)
    assert [table.text(i) for i in range(len(table))] == [single.text(i) for i in range(len(single))]
    a, b = table.embeddings.float().numpy(), single.embeddings.float().numpy()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_train_on_one_cuda_rank_saves_a_scorer(tiny_checkpoints, tmp_path):
    out = tmp_path / "run"
    done = torchrun(1, ["engine.cli", "train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]),
                        "--out", str(out), "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1",
                        "--batch-size", "64", "--train-examples", "150", "--val-examples", "60", "--test-examples",
                        "60", "--distributed"], CUDA_VISIBLE_DEVICES="0", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 ranks; test AUC" in done.stdout
    scorer = BAHEScorer.from_pretrained(out / "scorer", device="cpu")
    p = scorer.score([{"liked": ["Toy Story (1995) | Animation, Children's, Comedy"]}], ["Heat (1995)"])
    assert p.shape == (1,) and 0 < float(p[0]) < 1
