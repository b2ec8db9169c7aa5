"""Training loop shared by BAHE and the baselines: BCE on click labels, AdamW (backbone layers at a
lower learning rate than new parameters), early stopping on validation AUC, best weights restored."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from engine.model.head import CTRHead
from engine.training.data.log import BehaviorLog
from engine.training.loops.data_parallel import DataParallel, split_users
from engine.training.studies.memory import HeapTrimmer, PeakMemory
from engine.training.studies.metrics import log_loss, roc_auc

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimization settings; the same for every model compared."""
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3            # new parameters: head, empty-sequence vectors, positions, id embeddings
    backbone_lr: float = 5e-5   # pretrained upper layers
    weight_decay: float = 0.01
    patience: int = 1           # epochs without a better validation AUC before stopping
    norm_batches: int = 64      # batches whose statistics the heads' BatchNorm is calibrated on, then frozen
    max_grad_norm: float = 1.0
    eval_batch_size: int = 256
    seed: int = 0
    progress: bool = True
    lr_decay: bool = False      # both learning rates fall linearly to 0 over the planned epochs' steps (early
                                # stopping may end sooner); off: constant rates
    fused_optimizer: bool = True  # AdamW's fused kernel: the same update rule, each tensor updated in one pass
                                  # (about 4.7x faster steps on the CPU, docs/training-speed.md); its float rounding
                                  # differs from the per-op update's in the last bits; False: the per-op update


@dataclass
class FitResult:
    best_val_auc: float
    best_epoch: int
    epoch_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0      # peak during training (RSS on CPU, allocator peak on CUDA)
    added_memory_bytes: int = 0     # that peak minus the level when training started
    history: list[dict] = field(default_factory=list)


class BestEpoch:
    """Early stopping on validation AUC: after each epoch, keep the model's state if the AUC is the best so far
    (every trained parameter and every buffer, BatchNorm statistics too: the validated model, whole), say when
    `patience` epochs passed without a better one; `restore` puts the best epoch's state back."""

    def __init__(self, model: nn.Module, result: FitResult, patience: int) -> None:
        self.model, self.result, self.patience, self.stale, self.state = model, result, patience, 0, None
        self.kept = ({n for n, p in model.named_parameters() if p.requires_grad} |
                     {n for n, _ in model.named_buffers()})

    def stops_after(self, epoch: int, val_auc: float) -> bool:
        if val_auc > self.result.best_val_auc:
            self.result.best_val_auc, self.result.best_epoch, self.stale = val_auc, epoch, 0
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.kept}
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self) -> None:
        if self.state is not None:
            self.model.load_state_dict(self.state, strict=False)


def epoch_order(model: nn.Module, data: BehaviorLog, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An epoch's example order: the model's own (timeline models keep a user's targets together) or shuffled.
    Shared by `fit` and the streamed loop (`fit_stream`), so both visit examples the same way."""
    return model.epoch_order(rows, data, rng) if hasattr(model, "epoch_order") else rng.permutation(rows)


def row_batches(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of `rows` of `size` examples (the last one shorter): the training steps of an epoch."""
    for start in range(0, rows.size, size):
        yield rows[start:start + size]


def predict(model: nn.Module, data: BehaviorLog, rows: np.ndarray, *, batch_size: int = 256,
            device: torch.device | str = "cpu") -> np.ndarray:
    """(len(rows),) float64 click probabilities."""
    model.eval()
    out = np.empty(rows.size, dtype=np.float64)
    with torch.inference_mode():
        done = 0
        for chunk in row_batches(rows, batch_size):
            logits = model(model.prepare(data, chunk).to(torch.device(device)))
            out[done:done + chunk.size] = torch.sigmoid(logits.float()).cpu().numpy()
            done += chunk.size
    return out


def evaluate(model: nn.Module, data: BehaviorLog, rows: np.ndarray, *, batch_size: int = 256,
             device: torch.device | str = "cpu", parallel: DataParallel | None = None) -> dict[str, float]:
    """AUC and log loss on `rows`, with the prediction time per 1,000 examples. With `parallel`, each rank
    predicts its users' rows and rank 0 computes the metrics once on every rank's scores (all ranks get them)."""
    start = time.perf_counter()
    if parallel is not None and parallel.world_size > 1:
        mine = split_users(rows, data, parallel.world_size)[parallel.rank]
        gathered = parallel.gather_predictions(mine, predict(model, data, mine, batch_size=batch_size, device=device))
        metrics = None if gathered is None else _metrics(data.label[gathered[0]], gathered[1])
        metrics = parallel.broadcast(metrics)
    else:
        metrics = _metrics(data.label[rows], predict(model, data, rows, batch_size=batch_size, device=device))
    return {**metrics, "seconds_per_1k": 1000 * (time.perf_counter() - start) / max(rows.size, 1)}


def _metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"auc": roc_auc(labels, probs), "logloss": log_loss(labels, probs)}


def calibrate_norms(model: nn.Module, data: BehaviorLog, chunks: list[np.ndarray], device: torch.device,
                    parallel: DataParallel | None = None) -> None:
    """Accumulate every CTR head's BatchNorm statistics over `chunks` (an equal average), then freeze them
    (CTRHead.freeze_norm): the same per-feature standardization for every batch of training and for inference.
    With `parallel` each rank runs its share of the chunks and the statistics are averaged over the ranks."""
    heads = [m for m in model.modules() if isinstance(m, CTRHead)]
    if not heads or not chunks:
        return
    shared = parallel is not None and parallel.world_size > 1
    chunks = parallel.calibration_share(chunks) if shared else chunks
    for head in heads:
        head.norm_frozen = False   # a model trained before (another split, another seed) calibrates afresh
        head.norm.reset_running_stats()
        head.norm.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in chunks:
            model(model.prepare(data, chunk).to(device))
    if shared:
        parallel.sync_norms(model)
    for head in heads:
        head.freeze_norm()


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """AdamW over the trainable parameters, the pretrained ones at `backbone_lr`; and those parameters."""
    pretrained = {id(p) for p in model.pretrained_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in pretrained], "lr": config.backbone_lr},
              {"params": [p for p in trainable if id(p) not in pretrained], "lr": config.lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay,
                             fused=config.fused_optimizer or None), trainable


def linear_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's rate times max(0, 1 - step / total_steps), advanced once per optimizer step: large steps
    while the head is far from a fit, small ones at the end, instead of a constant rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(total_steps, 1)))


class Optimization:
    """The step both training loops take (`fit`, the streamed `fit_stream`): zero the gradients, back-propagate,
    clip the trainable parameters' norm, step AdamW and, with config.lr_decay, the linear decay over
    `total_steps` (the planned epochs' optimizer steps)."""

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int) -> None:
        self.optimizer, self.trainable = make_optimizer(model, config)
        self.max_grad_norm = config.max_grad_norm
        self.schedule = linear_decay(self.optimizer, total_steps) if config.lr_decay else None

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()


def end_epoch(model: nn.Module, result: FitResult, best: BestEpoch, seconds: float, train_loss: float,
              val: dict[str, float], **extra: int) -> bool:
    """Record a finished epoch in `result` (its time, train loss, validation AUC and log loss, `extra`), log it,
    and say whether early stopping ends training (`best`, which keeps the best epoch's state)."""
    epoch = len(result.history) + 1
    result.epoch_seconds.append(seconds)
    result.history.append({"epoch": epoch, "train_loss": train_loss, "val_auc": val["auc"],
                           "val_logloss": val["logloss"], **extra})
    log.info("%s epoch %d: train loss %.4f, val AUC %.4f, %.1f s%s", model.name, epoch, train_loss, val["auc"],
             seconds, "".join(f", {k} {v}" for k, v in extra.items()))
    return best.stops_after(epoch, val["auc"])


def _step_loss(model: nn.Module, runner: nn.Module, data: BehaviorLog, chunk: np.ndarray, device: torch.device,
               parallel: DataParallel | None) -> tuple[torch.Tensor, float]:
    """The loss to back-propagate for the global batch `chunk`, and its sum of per-example BCE on this rank.
    One process: the batch mean. Data-parallel: this rank's users, sum * world / len(chunk), so that DDP's
    average over ranks is the gradient of the whole batch's mean (engine.training.loops.data_parallel)."""
    if parallel is None or parallel.world_size == 1:
        labels = torch.from_numpy(data.label[chunk].astype(np.float32)).to(device)
        loss = nn.functional.binary_cross_entropy_with_logits(runner(model.prepare(data, chunk).to(device)), labels)
        return loss, loss.item() * chunk.size
    rows, weights = parallel.local_rows(chunk, data)
    labels = torch.from_numpy(data.label[rows].astype(np.float32)).to(device)
    summed = nn.functional.binary_cross_entropy_with_logits(
        runner(model.prepare(data, rows).to(device)), labels, weight=torch.from_numpy(weights).to(device),
        reduction="sum")
    return summed * (parallel.world_size / chunk.size), summed.item()


def fit(model: nn.Module, data: BehaviorLog, train_rows: np.ndarray, val_rows: np.ndarray, config: TrainConfig,
        *, device: torch.device | str = "cpu", parallel: DataParallel | None = None) -> FitResult:
    """Train `model` (BAHECTR, RawTokenCTR or IdOnlyCTR) in place; returns timing, memory and AUCs. With
    `parallel` (one per rank of a torchrun job, engine.training.loops.data_parallel) every rank calls fit with the same
    arguments and trains its users' share of each batch under DDP; every rank ends with the same model."""
    device = torch.device(device)
    model.to(device)
    shared = parallel is not None and parallel.world_size > 1
    torch.manual_seed(config.seed + (parallel.rank if shared else 0))  # dropout masks differ across ranks
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = -(-train_rows.size // config.batch_size)  # row_batches' count
    optimization = Optimization(model, config, config.epochs * steps_per_epoch)
    runner = parallel.wrap(model) if shared else model  # DDP: rank 0's parameters and buffers, everywhere
    result = FitResult(best_val_auc=-1.0, best_epoch=-1)
    best = BestEpoch(model, result, config.patience)
    trim = HeapTrimmer() if device.type == "cpu" else None  # glibc keeps freed batch memory as heap otherwise
    with PeakMemory(device) as peak:
        calibration = epoch_order(model, data, train_rows, np.random.default_rng(config.seed + 1))
        calibrate_norms(model, data, list(row_batches(calibration, config.batch_size))[:config.norm_batches], device,
                        parallel)
        for epoch in range(config.epochs):
            model.train()
            order = epoch_order(model, data, train_rows, rng)
            start, total_loss = time.perf_counter(), 0.0
            bar = tqdm(list(row_batches(order, config.batch_size)), desc=f"{model.name} epoch {epoch + 1}",
                       disable=not config.progress, leave=False)
            for chunk in bar:
                loss, summed = _step_loss(model, runner, data, chunk, device, parallel)
                optimization.step(loss)
                if trim is not None:
                    trim()
                total_loss += summed
                bar.set_postfix(loss=f"{summed / chunk.size:.4f}")
            if shared:
                total_loss = parallel.sum_float(total_loss)
                parallel.sync_seen(model)
            seconds = time.perf_counter() - start
            val = evaluate(model, data, val_rows, batch_size=config.eval_batch_size, device=device, parallel=parallel)
            if end_epoch(model, result, best, seconds, total_loss / max(train_rows.size, 1), val):
                break
    result.peak_memory_bytes, result.added_memory_bytes = peak.bytes, peak.added
    best.restore()
    model.eval()
    return result
