"""Data-parallel training (engine.training.loops.data_parallel): two gloo CPU ranks under DDP train the same parameters
as one process with the same global batches and seed, and end identical to each other."""
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import cli
from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.serving.scorer import BAHEScorer
from engine.training.loops.ctr_models import BAHECTR, rows_by_user
from engine.training.data import load_log
from engine.training.loops.data_parallel import DataParallel, split_users
from engine.training.loops.train import TrainConfig, fit
from tests.multiprocess import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "movielens_tiny.parquet"
TRAIN = TrainConfig(epochs=2, batch_size=48, norm_batches=3, patience=2, progress=False, seed=0)
# After 2 epochs of AdamW (10 steps, lr 1e-3) the parameters move by ~1e-2 (head) and ~5e-4 (upper layers); two
# ranks differ from one process by float reduction order (gradients summed in two parts, then averaged; BatchNorm
# statistics averaged over ranks; a user's sequences packed with other users), about 1e-7 relative in a gradient,
# which Adam's m / sqrt(v) can enlarge where a gradient component nearly cancels. Measured: at most 2.8e-4 of the
# parameter's own movement. A wrong loss weighting (each rank's mean) gives 1.4 and a missing world-size factor
# 0.84, so the bound below (2e-3 of the movement) separates them by more than 400x.
MOVEMENT_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def log():
    return load_log(FIXTURE)


def test_split_users_keeps_users_whole_and_balances(log):
    rows = rows_by_user(log.examples, log, np.random.default_rng(1))
    for world in (1, 2, 3):
        for start in range(0, rows.size, 97):
            batch = rows[start:start + 97]
            parts = split_users(batch, log, world)
            assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(batch))
            owners = [{int(u) for u in log.user[p]} for p in parts]
            assert all(not (owners[a] & owners[b]) for a in range(world) for b in range(a + 1, world))
            biggest = max(np.unique(log.user[batch], return_counts=True)[1])
            sizes = [p.size for p in parts]
            assert max(sizes) - min(sizes) <= biggest  # greedy largest-first: within one user's rows
    assert [p.size for p in split_users(rows[:0], log, 2)] == [0, 0]


def _setup(model, tables, log):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=8, dropout=0.0,
                                            head_hidden=(16, 8), categorical_features=("user_id",)))
    torch.manual_seed(0)
    scorer = BAHEScorer.create(model, behavior_texts=log.item_id_texts, item_texts=log.item_id_texts,
                               tables_dir=tables, config=config, device="cpu", progress=False)
    rows = log.examples  # 8 users, a few per batch; user 2's 61 rows make a batch where one rank has none
    return BAHECTR(scorer, log), np.union1d(rows[::3], rows[log.user[rows] == 2]), np.sort(rows[1::3])


def _state(model):
    kept = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in kept}


def _rank(rank, port, log, bahe, train, val, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = fit(bahe, log, train, val, TRAIN, parallel=DataParallel.from_process_group())
    torch.save({"state": _state(bahe), "history": result.history, "best": result.best_epoch}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_the_parameters_of_one_process(tiny_checkpoints, tmp_path, log):
    bahe, train, val = _setup(str(tiny_checkpoints["llama"]), tmp_path / "tables", log)
    initial = _state(bahe)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: each rank starts from this process's model, as it is now (the reference below trains it after)
    mp.start_processes(_rank, args=(port, log, bahe, train, val, tmp_path / "rank"), nprocs=2, join=True,
                       start_method="fork")
    result = fit(bahe, log, train, val, TRAIN)
    one = _state(bahe)
    ranks = [torch.load(f"{tmp_path / 'rank'}.{r}", weights_only=False) for r in range(2)]
    for name, value in one.items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # the ranks agree exactly
        if not value.is_floating_point():
            assert torch.equal(ranks[0]["state"][name], value), name  # 'seen' marks, batch counts
            continue
        moved = (value.double() - initial[name].double()).abs().max().item()
        assert moved > 0, name
        diff = (ranks[0]["state"][name].double() - value.double()).abs().max().item()
        assert diff <= MOVEMENT_TOLERANCE * moved, f"{name}: {diff:.3g} vs movement {moved:.3g}"
    assert ranks[0]["best"] == result.best_epoch
    for mine, theirs in zip(ranks[0]["history"], result.history):
        assert mine["val_auc"] == pytest.approx(theirs["val_auc"], abs=1e-9)
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


def test_distributed_training_needs_torchrun(monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="bahe train --distributed must be started by torchrun"):
        cli.main(["train", "--data", str(FIXTURE), "--out", str(tmp_path / "run"), "--distributed"])
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        DataParallel(2, 2)
    with pytest.raises(RuntimeError, match="needs a started process group"):
        DataParallel(0, 2)


def _cli_rank(rank, port, argv, out):
    import contextlib
    import io
    import os
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it hangs there)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(argv)
    (out / f"stdout.{rank}").write_text(printed.getvalue())


@pytest.mark.slow
def test_train_command_on_two_ranks_saves_one_scorer(tiny_checkpoints, tmp_path):
    """`bahe train --distributed` as torchrun runs it (its environment set per rank; forked, not launched)."""
    from engine.serving.scorer import BAHEScorer
    out = tmp_path / "run"
    argv = ["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
            "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--batch-size", "64", "--train-examples",
            "150", "--val-examples", "60", "--test-examples", "60", "--device", "cpu", "--distributed"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_cli_rank, args=(port, argv, tmp_path), nprocs=2, join=True, start_method="fork")
    said = (tmp_path / "stdout.0").read_text()
    assert "2 ranks; test AUC" in said and "train examples/s" in said
    assert (tmp_path / "stdout.1").read_text() == ""  # rank 0 alone reports and saves
    scorer = BAHEScorer.from_pretrained(out / "scorer", device="cpu")
    p = scorer.score([{"liked": ["Toy Story (1995) | Animation, Children's, Comedy"]}],
                     ["Heat (1995) | Action, Crime, Thriller"])
    assert p.shape == (1,) and 0 < float(p[0]) < 1
