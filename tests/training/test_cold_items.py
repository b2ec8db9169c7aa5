"""engine.training.data.cold_items (cold subsets, the held-out-items split) and engine.training.loops.unseen_items
(held-out items scored as unseen ids) on the generated MovieLens-1M fixture."""
import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.training.data.cold_items import cold_subsets, held_out_items_split, training_examples_per_item
from engine.training.data.movielens_1m import load_movielens_1m
from engine.training.loops.ctr_models import IdOnlyCTR, SideOnlyCTR
from engine.training.loops.train import predict
from engine.training.loops.unseen_items import give_unseen_bucket
from tests.ml1m_fixture import write_ml1m_files


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return load_movielens_1m(write_ml1m_files(tmp_path_factory.mktemp("ml-1m")))


def test_cold_subsets(log):
    split = log.split()
    per_item = training_examples_per_item(log, split.train)
    assert per_item.sum() == split.train.size and per_item.shape == log.item_ids.shape
    subsets = cold_subsets(log, split.train, split.test, (1, 5, 20))
    for k, positions in subsets.items():
        brute = [p for p, row in enumerate(split.test.tolist())
                 if int((log.item[split.train] == log.item[row]).sum()) < k]
        assert positions.tolist() == brute
    assert subsets[5].size <= subsets[20].size and subsets[20].size > 0


def test_held_out_items_split(log):
    split = log.split()
    rows, held = held_out_items_split(log, dict(split.items()), 0.1, seed=3)
    assert held.size == round(0.1 * log.item_ids.size) and np.isin(held, log.item_ids).all()
    assert not np.isin(log.item[rows["train"]], held).any() and not np.isin(log.item[rows["val"]], held).any()
    assert np.isin(log.item[rows["test"]], held).all()
    assert np.isin(rows["test"], split.test).all() and np.isin(rows["train"], split.train).all()
    assert rows["train"].size + (np.isin(log.item[split.train], held)).sum() == split.train.size
    again, same = held_out_items_split(log, dict(split.items()), 0.1, seed=3)
    assert (same == held).all() and all((again[k] == rows[k]).all() for k in rows)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got 0"):
        held_out_items_split(log, dict(split.items()), 0)
    with pytest.raises(ValueError, match=r"missing \['val'\]"):
        held_out_items_split(log, {"train": split.train, "test": split.test})


def test_held_out_items_score_as_unseen_ids(log):
    torch.manual_seed(0)
    config = ModelConfig(sequence_names=log.sequence_names, head_hidden=(16, 8), max_behaviors=8)
    side, ids = SideOnlyCTR(config, log), IdOnlyCTR(config, log)
    held = log.item_ids[[0, 3, 5]]
    before = ids.embedding.detach().clone()
    give_unseen_bucket(side, held)
    give_unseen_bucket(ids, held)
    weight = side.side.item_id.weight
    assert torch.equal(weight[torch.from_numpy(side.row[held])], weight[-1].expand(3, -1))
    others = np.setdiff1d(np.arange(log.item_ids.size), side.row[held])
    assert torch.equal(ids.embedding[torch.from_numpy(ids.row[held])], before[others].mean(0).expand(3, -1))
    assert torch.equal(ids.embedding[torch.from_numpy(others)], before[others])
    rows = log.examples[np.isin(log.item[log.examples], held)]
    assert rows.size > 0 and np.isfinite(predict(ids, log, rows)).all()
    with pytest.raises(TypeError, match="no unseen item-id bucket is known for Linear"):
        give_unseen_bucket(torch.nn.Linear(2, 2), held)


def test_sequential_id_model_takes_its_unseen_row(tiny_checkpoints, log):
    from engine.backbone.split import UpperEncoder
    from engine.training.loops.sequential_id import SequentialIdCTR
    from weights.checkpoint import Checkpoint

    torch.manual_seed(0)
    like = UpperEncoder.from_checkpoint(Checkpoint(tiny_checkpoints["bert"]), 2, causal=True)
    config = ModelConfig(sequence_names=log.sequence_names, max_behaviors=16, head_hidden=(8,))
    model = SequentialIdCTR(like, config, log, log.split().train)
    held = model.items[[0, 2]]  # items training saw: rows of their own until now
    rows = torch.from_numpy(model.item_rows(held))
    assert (rows != model.unseen_row).all()
    give_unseen_bucket(model, held)
    assert torch.equal(model.embedding[rows], model.embedding[model.unseen_row].expand(2, -1))
    side = model.model.side.item_id.weight
    assert side.shape[0] == model.unseen_row + 1 and torch.equal(side[rows], side[-1].expand(2, -1))
