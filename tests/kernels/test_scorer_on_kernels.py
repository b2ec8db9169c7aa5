"""With the Triton kernels (interpreted on the CPU here), BAHEScorer gives the reference path's scores."""
import numpy as np
import pytest

from kernels import ops
from tests.serving.test_scorer import ITEMS, make_scorer, random_users

pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_kernel_path_matches_reference_path(tiny_checkpoints, tmp_path, family, monkeypatch):
    scorer = make_scorer(tiny_checkpoints[family], tmp_path)
    users = random_users(np.random.default_rng(5), 4) + [{}]
    items = ITEMS + ["an item never seen"]
    reference = scorer.score(users, items)
    called = []
    real_resolve = ops.resolve
    monkeypatch.setattr(ops, "resolve", lambda *t: called.append(real_resolve(*t)) or called[-1])
    scorer.kernels = "triton"
    kernel = scorer.score(users, items)
    assert set(called) == {"triton"}
    np.testing.assert_allclose(kernel, reference, rtol=1e-4, atol=1e-5)
