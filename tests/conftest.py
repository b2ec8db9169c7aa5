"""Shared fixtures. TRITON_INTERPRET must be set before any @triton.jit module is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny_models import FAMILIES, make_tiny_checkpoint  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the SmolLM2 model, forked ranks (torchrun, mp.start_processes) and the "
                            "end-to-end scripts and demo; `make test` runs them, `make test-fast` (-m 'not slow') not")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> folder of a tiny random 4-layer checkpoint (BERT, Llama, Qwen2), made once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_tiny_checkpoint(root / family, family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family_checkpoint(request, tiny_checkpoints):
    """(family, folder), once per supported family."""
    return request.param, tiny_checkpoints[request.param]
