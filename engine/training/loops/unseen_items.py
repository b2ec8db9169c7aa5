"""Held-out items in the id models: after training, their learned item-id embedding is replaced by the unseen
bucket's (the row every id never trained on shares), so a held-out item is scored as an unknown id."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.model.head import SideInputs
from engine.training.loops.ctr_models import BAHECTR, IdOnlyCTR, SideOnlyCTR
from engine.training.loops.sequential_id import SequentialIdCTR

__all__ = ["give_unseen_bucket"]


def _side_item_rows(side: SideInputs, rows: np.ndarray) -> None:
    if side.item_id is not None:
        weight = side.item_id.weight
        weight[torch.from_numpy(rows)] = weight[weight.shape[0] - 1].clone()


def _text_only(id_rows: torch.Tensor | None, rows: np.ndarray) -> None:
    """Zero the learned id rows (ModelConfig.id_rows) of table `rows`: those items read their ABE row alone."""
    if id_rows is not None:
        id_rows[torch.from_numpy(rows[rows < id_rows.shape[0]])] = 0


@torch.no_grad()
def give_unseen_bucket(model: nn.Module, item_ids: np.ndarray) -> None:
    """Make `model` score the items `item_ids` as unseen ids: BAHE and the model without text take their
    unseen item-id row; the sequential id model its unseen row, in its behavior embedding and its item-id side
    embedding (items it met only inside training histories have rows of their own until then); the id-only model
    (no such row) the mean of the other items' embeddings; a model with a `give_unseen_bucket(item_ids)` method
    is left to it. TypeError for another model."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if hasattr(model, "give_unseen_bucket"):
        model.give_unseen_bucket(item_ids)
    elif isinstance(model, BAHECTR):
        _side_item_rows(model.model.side, model.item_row[item_ids])
        _text_only(model.model.behavior_id_rows, model.behavior_row[item_ids])
        _text_only(model.model.item_id_rows, model.item_row[item_ids])
    elif isinstance(model, SequentialIdCTR):
        rows = model.item_rows(item_ids)
        rows = rows[rows != model.unseen_row]
        model.embedding[torch.from_numpy(rows)] = model.embedding[model.unseen_row].clone()
        _side_item_rows(model.model.side, rows)
    elif isinstance(model, SideOnlyCTR):
        _side_item_rows(model.side, model.row[item_ids])
    elif isinstance(model, IdOnlyCTR):
        rows = torch.from_numpy(model.row[item_ids])
        keep = torch.ones(model.embedding.shape[0], dtype=torch.bool)
        keep[rows] = False
        model.embedding[rows] = model.embedding[keep].mean(dim=0)
    else:
        raise TypeError(f"no unseen item-id bucket is known for {type(model).__name__}")
