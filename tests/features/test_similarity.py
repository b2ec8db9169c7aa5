"""Similarity-weighted counts (engine.features.similarity): known values, the model's batch path against a brute-force
recomputation, and the config's format-version defaults."""
import math

import numpy as np
import pytest
import torch

from engine.backbone.split import UpperEncoder
from engine.config import ModelConfig, ScorerConfig
from engine.model.bahe_model import BAHEModel
from engine.features.similarity import (segment_sums, similarity_feature_names, similarity_features, similarity_weights,
                               unit_rows)
from tests.random_batches import random_packed_batch
from weights.checkpoint import Checkpoint


def test_known_values():
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    targets = torch.tensor([[2.0, 0.0]] * 3)
    w = similarity_weights((unit_rows(rows) * unit_rows(targets)).sum(1), (0.5, 1.0))
    expected = [[1.0, 1.0], [math.exp(-2.0), math.exp(-1.0)], [math.exp(-4.0), math.exp(-2.0)]]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))
    sums = segment_sums(w, torch.tensor([0, 2, 2, 3]))
    torch.testing.assert_close(sums, torch.stack([w[0] + w[1], torch.zeros(2, dtype=torch.float64), w[2]]))
    features = similarity_features(sums.view(1, 3, 2))
    assert features.shape == (1, 12) and features.dtype == torch.float32
    top = sums.amax(dim=0)
    torch.testing.assert_close(features[0, :6], torch.log1p(sums).flatten().float())
    torch.testing.assert_close(features[0, 6:], ((sums + 1) / (top + 2)).flatten().float())
    assert similarity_feature_names(("a", "b", "c"), (0.5, 1.0))[:2] == ["similar_log1p_a_t0.5", "similar_log1p_a_t1"]


def test_a_zero_row_weighs_like_an_orthogonal_one():
    w = similarity_weights(unit_rows(torch.zeros(1, 3)) @ unit_rows(torch.ones(1, 3)).T[:, 0], (0.1,))
    torch.testing.assert_close(w, torch.tensor([[math.exp(-10.0)]], dtype=torch.float64))


def test_model_similar_equals_brute_force(tiny_checkpoints):
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    config = ModelConfig(max_behaviors=9, head_hidden=(16,), similarity_temperatures=(0.05, 0.3))
    model = BAHEModel(UpperEncoder.from_checkpoint(ckpt, 2, causal=True), config, num_items=5).eval()
    rng = np.random.default_rng(1)
    behaviors, items = torch.randn(30, ckpt.hidden_size), torch.randn(8, ckpt.hidden_size)
    batch = random_packed_batch(rng, 4, model.num_sequences, config.max_behaviors, 30, 8)
    with torch.no_grad():
        similar = model.similar(behaviors, items, batch)
    n, offsets = model.num_sequences, batch.offsets.tolist()
    b, it = behaviors.double().numpy(), items.double().numpy()
    expected = np.zeros((4, n, 2))
    for k in range(4 * n):
        v = it[int(batch.item_rows[k // n])]
        for j in range(offsets[k], offsets[k + 1]):
            r = b[int(batch.behavior_rows[j])]
            cos = r @ v / (np.linalg.norm(r) * np.linalg.norm(v))
            expected[k // n, k % n] += np.exp((cos - 1) / np.array([0.05, 0.3]))
    np.testing.assert_allclose(similar.numpy(), expected, rtol=1e-6, atol=1e-9)
    assert expected[0, 0].sum() == 0  # the empty sequence
    logits = model(behaviors, items, batch)
    assert torch.isfinite(logits).all()


def test_format_versions_give_the_meaning_of_their_time():
    old = ScorerConfig.from_dict({"model": {}}, format_version=3)
    assert old.model.similarity_temperatures == () and old.model.count_features  # introduced by format 3
    assert ScorerConfig.from_dict({"model": {}}, format_version=2).model.count_features is False
    assert ScorerConfig.from_dict({"model": {}}).model.similarity_temperatures == ModelConfig().similarity_temperatures
    assert ModelConfig().text_only().similarity_temperatures == ()


@pytest.mark.parametrize("bad", [(0.0,), (-1.0,), (float("nan"),), (float("inf"),), ("0.1",)])
def test_bad_temperatures_are_refused(bad):
    with pytest.raises(ValueError, match="similarity_temperatures"):
        ModelConfig(similarity_temperatures=bad)
