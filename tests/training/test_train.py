"""The training loop: the best epoch's model is the one returned (parameters and buffers, BatchNorm running
statistics included), and the heads' BatchNorm is calibrated then frozen."""
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.training.loops import train as train_module
from engine.training.loops.ctr_models import SideOnlyCTR
from engine.training.data import load_log
from engine.training.loops.train import TrainConfig, fit

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


@pytest.fixture(scope="module")
def log():
    return load_log(FIXTURE)


def _model(log):
    torch.manual_seed(0)
    return SideOnlyCTR(ModelConfig(sequence_names=log.sequence_names, head_hidden=(16, 8)), log)


@pytest.mark.parametrize("best_epoch", [1, 2])
def test_the_best_epoch_is_restored_with_its_buffers(log, monkeypatch, best_epoch):
    scripted = [0.6, 0.5, 0.4] if best_epoch == 1 else [0.5, 0.7, 0.6]
    snapshots = []

    def scripted_evaluate(model, data, rows, **kwargs):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"auc": scripted[len(snapshots) - 1], "logloss": 0.6, "seconds_per_1k": 0.0}

    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate)
    model = _model(log)
    rows = log.examples
    result = fit(model, log, rows[:300], rows[300:], TrainConfig(epochs=3, patience=3, batch_size=32,
                                                                 norm_batches=0, progress=False))
    assert result.best_epoch == best_epoch and len(snapshots) == 3
    best, last = snapshots[best_epoch - 1], snapshots[-1]
    assert not torch.equal(best["head.norm.running_mean"], last["head.norm.running_mean"])  # buffers moved on
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=0, msg=name)


def test_norm_statistics_are_calibrated_then_frozen(log):
    model = _model(log)
    rows = log.examples
    fit(model, log, rows[:300], rows[300:], TrainConfig(epochs=1, batch_size=32, norm_batches=4, progress=False))
    head = model.head
    assert head.norm_frozen and head.norm.num_batches_tracked.item() == 4
    frozen = head.norm.running_mean.clone()
    model.train()
    batch = model.prepare(log, np.sort(rows[:64]))
    model(batch)
    torch.testing.assert_close(head.norm.running_mean, frozen, rtol=0, atol=0)


def test_a_second_fit_calibrates_afresh(log):
    """A model trained once (the demo trains one scorer on two splits) gets new statistics from its new data."""
    model = _model(log)
    rows = log.examples
    config = TrainConfig(epochs=1, batch_size=32, norm_batches=4, progress=False)
    fit(model, log, rows[:200], rows[300:], config)
    first = model.head.norm.running_mean.clone()
    fit(model, log, rows[200:400], rows[400:], config)
    assert model.head.norm.num_batches_tracked.item() == 4
    assert not torch.allclose(model.head.norm.running_mean, first)


def test_the_fused_optimizer_takes_the_same_steps(log):
    """AdamW's fused kernel (the default) and the per-op update move every parameter alike (float rounding apart),
    with the two learning rates and weight decay applied to the same parameters (measured: at most 2.8e-6 of a
    parameter's own movement after 2 epochs)."""
    rows = log.examples
    states = []
    for fused in (False, True):
        model = _model(log)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fit(model, log, rows[:300], rows[300:], TrainConfig(epochs=2, patience=2, batch_size=32, norm_batches=2,
                                                            progress=False, fused_optimizer=fused))
        states.append({k: (v.detach().clone(), initial[k]) for k, v in model.state_dict().items()})
    moved = 0
    for name, (per_op, start) in states[0].items():
        fused, _ = states[1][name]
        if not torch.is_floating_point(per_op) or torch.equal(per_op, start):
            continue
        moved += 1
        movement = (per_op - start).abs().max()
        assert (fused - per_op).abs().max() <= 1e-4 * movement, name
    assert moved >= 5


def test_linear_decay_reaches_zero_at_the_planned_end(log, monkeypatch):
    """lr_decay: the rates the optimizer steps with fall linearly from the configured ones to 0 over
    epochs x batches; off, they stay constant."""
    seen = []
    real = torch.optim.AdamW.step

    def record(self, *args, **kw):
        seen.append([group["lr"] for group in self.param_groups])
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    rows = log.examples
    for decay in (False, True):
        seen.clear()
        fit(_model(log), log, rows[:256], rows[256:], TrainConfig(epochs=2, patience=2, batch_size=32, lr=1e-3,
                                                                  norm_batches=2, progress=False, lr_decay=decay))
        steps = 2 * 8
        assert len(seen) == steps
        head_rates = [groups[-1] for groups in seen]  # the new parameters' group, at lr
        if not decay:
            assert head_rates == [1e-3] * steps
        else:
            assert head_rates == pytest.approx([1e-3 * (1 - k / steps) for k in range(steps)])
