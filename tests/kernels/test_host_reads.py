"""The forward passes read no device value back to the host: ids and offsets are validated once at
the boundary, and the longest sequence travels as a host int (max_len). Run with the Triton
kernels forced (interpreted on the CPU here), with every read of a tensor's values recorded and
only the interpreter's own reads inside a launch allowed."""
import numpy as np
import pytest
import torch

from engine.backbone.split import LowerEncoder, UpperEncoder
from engine.config import ModelConfig
from engine.model.bahe_model import BAHEModel
from kernels import ops
from kernels._jagged import offsets_from_lengths
from tests.host_reads import host_reads, reads_between_launches
from tests.random_batches import random_packed_batch
from weights.checkpoint import Checkpoint

pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="triton is not installed")


def test_guard_sees_reads_between_launches():
    """The guard itself: a read between two launches is reported, reads inside a launch are not."""
    values, offsets = torch.randn(5, 8), torch.tensor([0, 2, 5])
    with ops.use_backend("triton"), host_reads() as log:
        ops.jagged_mean(values, offsets)
        int(offsets[-1])
        ops.jagged_mean(values, offsets)
    assert reads_between_launches(log) == ["read __int__"]
    assert [e for e in log if e.startswith("launch")] == ["launch _pool_mean_kernel"] * 2


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_bahe_model_forward_reads_nothing(tiny_checkpoints, family):
    ckpt = Checkpoint(tiny_checkpoints[family])
    config = ModelConfig(max_behaviors=9, head_hidden=(32, 16))
    model = BAHEModel(UpperEncoder.from_checkpoint(ckpt, 2, causal=True), config, num_items=10).eval()
    rng = np.random.default_rng(0)
    behaviors, items = torch.randn(40, ckpt.hidden_size), torch.randn(12, ckpt.hidden_size)
    batch = random_packed_batch(rng, 3, model.num_sequences, config.max_behaviors, 40, 12)  # host-validated
    with torch.inference_mode():
        with ops.use_backend("torch"):
            reference = model(behaviors, items, batch)
        with ops.use_backend("triton"), host_reads() as log:
            logits = model(behaviors, items, batch)
    launched = {e.removeprefix("launch ") for e in log if e.startswith("launch")}
    expected = {"_jagged_gather_kernel", "_varlen_attention_kernel", "_pool_mean_kernel", "_ctr_mlp_kernel"}
    assert launched == expected | ({"_rope_kernel"} if family != "bert" else set())
    assert reads_between_launches(log) == []
    assert [e for e in log if e.startswith("read")] == []  # nor before the first or after the last launch
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_encoder_forward_packed_reads_nothing(tiny_checkpoints, family):
    ckpt = Checkpoint(tiny_checkpoints[family])
    lower, upper = LowerEncoder(ckpt, 2), UpperEncoder.from_checkpoint(ckpt, 2)
    lengths = [3, 0, 7, 1]
    offsets = offsets_from_lengths(torch.tensor(lengths))
    ids = torch.randint(0, ckpt.config.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), ops.use_backend("triton"), host_reads() as log:
        states = upper.forward_packed(lower.forward_packed(ids, offsets, max(lengths)), offsets, max(lengths))
    assert sum(e.startswith("launch") for e in log) >= 4
    assert [e for e in log if e.startswith("read")] == []
    with torch.inference_mode(), ops.use_backend("torch"):
        reference = upper.forward_packed(lower.forward_packed(ids, offsets, max(lengths)), offsets, max(lengths))
    torch.testing.assert_close(states, reference, rtol=1e-4, atol=1e-5)


def test_bahe_model_forward_over_int8_tables_reads_nothing(tiny_checkpoints):
    """int8 tables (QuantizedRows) go through the same gather kernels with SCALED set: still no host read."""
    from kernels.dequant_gather import QuantizedRows
    from weights.row_codec import quantize_rows
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    config = ModelConfig(max_behaviors=9, head_hidden=(32, 16))
    model = BAHEModel(UpperEncoder.from_checkpoint(ckpt, 2, causal=True), config, num_items=10).eval()
    rng = np.random.default_rng(1)
    behaviors = QuantizedRows(*quantize_rows(torch.randn(40, ckpt.hidden_size)))
    items = QuantizedRows(*quantize_rows(torch.randn(12, ckpt.hidden_size)))
    batch = random_packed_batch(rng, 3, model.num_sequences, config.max_behaviors, 40, 12)
    with torch.inference_mode():
        with ops.use_backend("torch"):
            reference = model(behaviors, items, batch)
        with ops.use_backend("triton"), host_reads() as log:
            logits = model(behaviors, items, batch)
    launched = {e.removeprefix("launch ") for e in log if e.startswith("launch")}
    assert {"_jagged_gather_kernel", "_varlen_attention_kernel", "_rope_kernel"} <= launched
    assert [e for e in log if e.startswith("read")] == []
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
