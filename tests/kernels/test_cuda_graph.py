"""On a GPU: a whole BAHEModel forward (Triton kernels) makes no device -> host synchronization
(`torch.cuda.set_sync_debug_mode("error")` turns one into an error), so it can be captured in a
CUDA graph and replayed with the eager forward's output. Skipped without CUDA."""
import numpy as np
import pytest
import torch

from engine.backbone.split import UpperEncoder
from engine.config import ModelConfig
from engine.model.bahe_model import BAHEModel
from kernels import ops
from tests.random_batches import random_packed_batch
from weights.checkpoint import Checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not ops.triton_available(),
                                reason="needs a CUDA GPU and triton")


def _setup(folder, users=4):
    """The full CTR model (causal upper layers, count features, item ids) and a host-validated batch, on CUDA."""
    device = torch.device("cuda")
    ckpt = Checkpoint(folder)
    config = ModelConfig(max_behaviors=20, head_hidden=(32, 16))
    model = BAHEModel(UpperEncoder.from_checkpoint(ckpt, 2, causal=True), config, num_items=10).to(device).eval()
    batch = random_packed_batch(np.random.default_rng(0), users, model.num_sequences, config.max_behaviors, 64, 16)
    behaviors = torch.randn(64, ckpt.hidden_size, device=device)
    items = torch.randn(16, ckpt.hidden_size, device=device)
    return model, behaviors, items, batch.to(device)


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_forward_makes_no_sync_and_replays_in_a_cuda_graph(tiny_checkpoints, family):
    model, behaviors, items, batch = _setup(tiny_checkpoints[family])
    with torch.inference_mode(), ops.use_backend("triton"):
        eager = model(behaviors, items, batch)  # compiles the kernels, fills the rotary tables
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = model(behaviors, items, batch)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.testing.assert_close(again, eager, rtol=0, atol=0)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(behaviors, items, batch)  # warm-up on a side stream, as CUDA graph capture wants
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(behaviors, items, batch)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-6)
        behaviors.mul_(0.5)  # new table values, same shapes: the replay recomputes from them
        expected = model(behaviors, items, batch)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, expected, rtol=1e-5, atol=1e-6)
