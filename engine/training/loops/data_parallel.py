"""Data-parallel training (`torchrun ... -m engine.cli train --distributed`): what `train.fit` does differently
when several processes (ranks) train one model.

- Every rank reads the same memory-mapped tables and draws the same epoch order (same seed), so all ranks see
  the same global batches, and therefore run the same number of steps (DDP would hang otherwise).
- Each global batch is split by user (timeline training needs a user's targets together): its users go to the
  ranks greedily by example count, largest first, each to the least loaded rank (`split_users`). `local_rows`
  takes any batch of example rows, so a data source that streams batches plugs in unchanged.
- The loss: rank r computes sum_i bce_i over its rows times world / B, B the global batch's examples. DDP
  averages gradients over ranks, so the gradient is (1/B) sum over the whole batch: the single-process mean,
  whatever the split (3 users on one rank, 1 on the other). A rank whose share is empty still runs a step, on
  one row of the batch with weight 0, so every rank joins every all-reduce.
- The heads' BatchNorm: the calibration batches (whole global batches, not split) are dealt round-robin to the
  ranks and the running statistics averaged with weights = batches per rank, which is the single-process
  cumulative average; then they are frozen (CTRHead.freeze_norm), so training never normalizes with batch
  statistics and needs no SyncBatchNorm. DDP syncs buffers once, at wrap time, not per step: they are kept equal by
  these explicit syncs (rank 0's would overwrite the other ranks' categorical 'seen' marks).
- Validation: the rows are split by user, each rank predicts its share, every rank's (row, score) pairs are
  gathered, rank 0 computes the metric once on all of them (in row order) and broadcasts it: every rank takes
  the same best-epoch decision and restores the same state.
- Dropout draws from torch's generator seeded with seed + rank (ranks draw different masks)."""
from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from engine.model.head import CTRHead
from engine.training.data.log import BehaviorLog

# Buffers are not re-broadcast before each forward (the BatchNorm statistics are averaged explicitly): torch
# 2.13's keyword for it, or the older one (2.11 on the GPU machines has only broadcast_buffers).
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})


def user_groups(rows: np.ndarray, log: BehaviorLog) -> list[np.ndarray]:
    """`rows` cut into runs of one user each (in order; a user's rows must be contiguous, as in every batch
    the trainer makes)."""
    if rows.size == 0:
        return []
    users = log.user[rows]
    bounds = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1, rows.size]
    return [rows[bounds[i]:bounds[i + 1]] for i in range(bounds.size - 1)]


def split_users(rows: np.ndarray, log: BehaviorLog, world_size: int) -> list[np.ndarray]:
    """The rows of each rank: whole users, largest first to the least loaded rank (ties: lowest rank), each
    rank's users kept in their order within `rows`."""
    groups = user_groups(rows, log)
    load, owner = np.zeros(world_size, dtype=np.int64), np.zeros(len(groups), dtype=np.int64)
    for g in sorted(range(len(groups)), key=lambda g: -groups[g].size):  # stable: ties in batch order
        owner[g] = int(np.argmin(load))
        load[owner[g]] += groups[g].size
    return [np.concatenate([groups[g] for g in np.flatnonzero(owner == r)] or [rows[:0]])
            for r in range(world_size)]


class DataParallel:
    """This rank's part of a data-parallel fit. Call every method on every rank, in the same order."""

    def __init__(self, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world size >= 1")
        if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
            raise RuntimeError(f"data-parallel training over {world_size} ranks needs a started process group of "
                               f"that size (engine.distributed.start)")
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_process_group(cls) -> DataParallel:
        return cls(dist.get_rank(), dist.get_world_size())

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over `model` (its parameters and buffers broadcast from rank 0 now, so every rank starts equal)."""
        return nn.parallel.DistributedDataParallel(model, device_ids=None, **NO_FORWARD_BUFFER_SYNC)

    def local_rows(self, rows: np.ndarray, log: BehaviorLog) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows of the global batch `rows` and their loss weights (1; or one row of weight 0 when
        the rank's share is empty, so that it still takes the step)."""
        mine = split_users(rows, log, self.world_size)[self.rank]
        if mine.size == 0:
            return user_groups(rows, log)[0][:1], np.zeros(1, dtype=np.float32)
        return mine, np.ones(mine.size, dtype=np.float32)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        backend_device = tensor.device if dist.get_backend() == "nccl" else torch.device("cpu")
        moved = tensor.to(backend_device)
        dist.all_reduce(moved)
        return moved.to(tensor.device)

    def sum_float(self, value: float) -> float:
        return float(self._sum(torch.tensor([value], dtype=torch.float64)))

    def calibration_share(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """The calibration batches this rank runs: whole global batches, dealt round-robin."""
        return chunks[self.rank::self.world_size]

    def sync_norms(self, model: nn.Module) -> None:
        """Average every CTR head's BatchNorm running statistics over the ranks, weighted by the batches each
        accumulated: the cumulative average over all calibration batches."""
        for head in (m for m in model.modules() if isinstance(m, CTRHead)):
            norm = head.norm
            count = norm.num_batches_tracked.to(torch.float64)
            stats = torch.cat([norm.running_mean.double() * count, norm.running_var.double() * count, count.view(1)])
            total = self._sum(stats)
            batches, width = total[-1], norm.running_mean.numel()
            if batches > 0:
                norm.running_mean.copy_(total[:width] / batches)
                norm.running_var.copy_(total[width:2 * width] / batches)
            norm.num_batches_tracked.fill_(int(batches))

    def sync_seen(self, model: nn.Module) -> None:
        """The categorical buckets seen in training by any rank (each rank marks only its own rows')."""
        for name, buffer in model.named_buffers():
            if name.endswith("category_seen") and buffer.numel():
                buffer.copy_(self._sum(buffer.to(torch.int32)) > 0)

    def gather_predictions(self, rows: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Every rank's (rows, probs), on rank 0 sorted by row (None elsewhere)."""
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((rows, probs), gathered, dst=0)
        if gathered is None:
            return None
        all_rows = np.concatenate([r for r, _ in gathered])
        all_probs = np.concatenate([p for _, p in gathered])
        order = np.argsort(all_rows, kind="stable")
        return all_rows[order], all_probs[order]

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
