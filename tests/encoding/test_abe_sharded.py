"""Distributed ABE (engine.encoding.abe_sharded, `bahe encode --distributed`): texts sharded by key over gloo CPU ranks,
rank 0 writing; the table equals a single-process build whatever the number of ranks, and a rank that dies
leaves the old table as it was."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import cli
from engine.encoding.abe import AtomicEncoder
from engine.encoding.abe_sharded import build_or_append, shard_of
from engine.distributed import Launch, LaunchError, check_not_launched, launch_from_env
from tests.multiprocess import torchrun
from tests.storage.test_table import HashEncoder
from weights.checkpoint import Checkpoint
from weights.table import BehaviorTable
from weights.text_key import text_keys

WORDS = "bought searched clicked watched liked latte coffee shoes running movie toy story comedy drama star".split()
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 9)) + f" {i % 37}" for i in range(120)]


def test_shards_cover_every_rank_and_depend_only_on_the_key():
    keys = text_keys(TEXTS)
    for world in (1, 2, 3, 5):
        owner = shard_of(keys, world)
        assert owner.min() >= 0 and owner.max() < world and np.unique(owner).size == world
        assert np.array_equal(owner, shard_of(keys[::-1].copy(), world)[::-1])
    with pytest.raises(ValueError, match="world_size"):
        shard_of(keys, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DyingEncoder(HashEncoder):
    """Rank `dies`' encoder: the process exits in the middle of its shard."""

    def __init__(self, dies: bool):
        super().__init__()
        self.dies = dies

    def encode(self, texts):
        if self.dies:
            os._exit(3)
        return super().encode(texts)


def _rank(rank, world, port, path, texts, dying_rank):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    build_or_append(path, texts, DyingEncoder(rank == dying_rank), Launch(rank, world, rank))
    dist.destroy_process_group()


def _spawn(world, path, texts, dying_rank=-1):
    # fork: the children start from this process (everything imported), in well under a second each
    mp.start_processes(_rank, args=(world, _free_port(), str(path), texts, dying_rank), nprocs=world, join=True,
                       start_method="fork")


@pytest.mark.slow
def test_three_ranks_equal_one_and_a_dead_rank_leaves_the_old_table(tmp_path):
    single = BehaviorTable.build(tmp_path / "one.safetensors", TEXTS[:80] + TEXTS, HashEncoder())
    single.append(TEXTS + ["new text a", "new text b"])
    path = tmp_path / "t.safetensors"
    _spawn(3, path, TEXTS[:80] + TEXTS)
    before = path.read_bytes()
    with pytest.raises(mp.ProcessExitedException):
        _spawn(2, path, TEXTS + ["new text a", "new text b"], dying_rank=1)
    assert path.read_bytes() == before  # untouched: rank 0 never reached the write
    _spawn(2, path, TEXTS + ["new text a", "new text b"])  # the re-run starts cleanly
    table = BehaviorTable.open(path)
    assert [table.text(i) for i in range(len(table))] == [single.text(i) for i in range(len(single))]
    assert np.array_equal(table.keys, single.keys) and torch.equal(table.embeddings, single.embeddings)
    table.verify()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_torchrun_build_then_append_equal_a_single_process(tiny_checkpoints, tmp_path):
    """The command under torchrun builds; an append over two ranks with the real encoder follows (forked)."""
    model = str(tiny_checkpoints["llama"])
    first = tmp_path / "first.txt"
    first.write_text("\n".join(TEXTS[:90]) + "\n")
    out = tmp_path / "two.safetensors"
    done = torchrun(2, ["engine.cli", "encode", str(first), "--model", model, "--lower-layers", "2", "--out", str(out),
                        "--distributed"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"built {out} over 2 ranks: 90 new rows" in done.stdout
    encoder = AtomicEncoder.from_checkpoint(Checkpoint(model), 2, progress=False)
    more = TEXTS[60:] + ["liked star wars", "watched the comedy"]
    mp.start_processes(_append_rank, args=(_free_port(), str(out), more, encoder), nprocs=2, join=True,
                       start_method="fork")
    single = BehaviorTable.build(tmp_path / "one.safetensors", TEXTS[:90], encoder)
    single.append(more)
    table = BehaviorTable.open(out, encoder, verify=True)
    assert len(table) == 122
    assert [table.text(i) for i in range(len(table))] == [single.text(i) for i in range(len(single))]
    scale = single.embeddings.abs().amax(dim=1, keepdim=True)
    assert bool(((table.embeddings - single.embeddings).abs() <= 1e-6 * scale).all())


def _append_rank(rank, port, path, texts, encoder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    action, added, _ = build_or_append(path, texts, encoder, Launch(rank, 2, rank))
    assert action == "appended" and (added == 32 or rank != 0)
    dist.destroy_process_group()


def test_distributed_flag_and_environment_must_agree(tiny_checkpoints, tmp_path, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("bought latte\n")
    args = ["encode", str(texts), "--model", str(tiny_checkpoints["bert"]), "--out", str(tmp_path / "t.safetensors")]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="must be started by torchrun.*RANK, WORLD_SIZE"):
        cli.main(args + ["--distributed"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="WORLD_SIZE=2: pass --distributed"):
        cli.main(args)
    assert not (tmp_path / "t.safetensors").exists()
    check_not_launched("x", {"WORLD_SIZE": "1"})  # a one-process torchrun job may run without the flag
    env = {"MASTER_ADDR": "localhost", "MASTER_PORT": "1"}
    for bad, message in (({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE must be >= 1"),
                         ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK must be in \[0, WORLD_SIZE=2\)"),
                         ({"RANK": "1", "WORLD_SIZE": "two", "LOCAL_RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
                         ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, r"LOCAL_RANK must be in \[0, RANK=0\]")):
        with pytest.raises(LaunchError, match=message):
            launch_from_env({**env, **bad})
    assert launch_from_env({**env, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Launch(1, 2, 1)


class NaNEncoder(HashEncoder):
    def encode(self, texts):
        return torch.full((len(texts), self.signature.hidden_size), float("nan"))


def _failing_rank(rank, port, path, report):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:  # rank 1's rows are NaN: rank 0's write refuses them, and rank 1 must hear of it
        build_or_append(path, TEXTS, NaNEncoder() if rank == 1 else HashEncoder(), Launch(rank, 2, rank))
    except Exception as err:  # noqa: BLE001
        (report / f"rank{rank}").write_text(f"{type(err).__name__}: {err}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_an_error_on_the_writer_fails_every_rank(tmp_path):
    path = tmp_path / "t.safetensors"
    mp.start_processes(_failing_rank, args=(_free_port(), str(path), tmp_path), nprocs=2, join=True,
                       start_method="fork")
    assert (tmp_path / "rank0").read_text().startswith("NonFiniteRowError")
    assert (tmp_path / "rank1").read_text().startswith("LaunchError: rank 0 failed: NonFiniteRowError")
    assert not path.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
