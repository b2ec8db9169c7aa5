"""One rank of the data-parallel equality test (tests/test_data_parallel.py), run by torchrun:
`python -m tests.ddp_fit_worker MODEL TABLES OUT`. Trains the tiny BAHE model of `fit_setup` with DDP and,
on rank 0, saves every trained parameter and buffer and the fit's history to OUT."""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.scorer import BAHEScorer
from engine.training.ctr_models import BAHECTR
from engine.training.data import load_log
from engine.training.data_parallel import DataParallel
from engine.training.train import TrainConfig, fit
from tests.multiprocess import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "movielens_tiny.parquet"
TRAIN = TrainConfig(epochs=2, batch_size=48, norm_batches=3, patience=2, progress=False, seed=0)


def fit_setup(model: str, tables: str):
    """(log, model, train rows, val rows): a tiny BAHE CTR model, dropout off (the masks would depend on how
    a batch is split), identical initial weights from seed 0."""
    log = load_log(FIXTURE)
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=8, dropout=0.0,
                                            head_hidden=(16, 8), categorical_features=("user_id",)))
    torch.manual_seed(0)
    scorer = BAHEScorer.create(model, behavior_texts=log.item_id_texts, item_texts=log.item_id_texts,
                               tables_dir=tables, config=config, device="cpu", progress=False)
    rows = log.examples  # 8 users: a few per batch; user 2's 61 rows make a batch where one rank has none
    return log, BAHECTR(scorer, log), np.union1d(rows[::3], rows[log.user[rows] == 2]), np.sort(rows[1::3])


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    kept = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in kept}


def main(model: str, tables: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    log, bahe, train, val = fit_setup(model, tables)
    result = fit(bahe, log, train, val, TRAIN, parallel=DataParallel.from_process_group())
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, trained_state(bahe))
    if dist.get_rank() == 0:
        torch.save({"states": states, "history": result.history, "best_epoch": result.best_epoch}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
