"""Learned id rows beside the frozen ABE rows (ModelConfig.id_rows): zero at first, trained, saved and served, and
read as text alone for rows the model never trained (appended later, held out, or encoded on the fly)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, ModelConfig, ScorerConfig
from engine.model.bahe_model import UNSEEN_ITEM, add_id_rows
from engine.training.data import load_log
from engine.training.loops.ctr_models import BAHECTR, rows_by_user
from engine.training.loops.sequential_id import SequentialIdCTR
from engine.training.loops.unseen_items import give_unseen_bucket

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


@pytest.fixture(scope="module")
def log():
    return load_log(FIXTURE)


def _scorer(checkpoint: Path, tables: Path, log, id_rows: bool) -> BAHEScorer:
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=16, count_features=False,
                                            id_rows=id_rows))
    torch.manual_seed(0)
    return BAHEScorer.create(checkpoint, behavior_texts=log.item_id_texts, item_texts=log.item_id_texts,
                             tables_dir=tables, config=config, device="cpu", progress=False)


def _requests(log, count: int = 40):
    rows = rows_by_user(log.examples, log, np.random.default_rng(1))[:count]
    return rows, log.sequence_texts(rows, None), log.target_texts(rows)


def test_add_id_rows_adds_trained_rows_and_nothing_past_them():
    x = torch.randn(5, 3)
    id_rows = torch.arange(6, dtype=torch.float32).view(2, 3)
    rows = torch.tensor([0, 1, 2, 7, 1])
    out = add_id_rows(x, id_rows, rows)
    torch.testing.assert_close(out[[0, 1, 4]], x[[0, 1, 4]] + id_rows[[0, 1, 1]])
    torch.testing.assert_close(out[[2, 3]], x[[2, 3]])
    assert add_id_rows(x, None, rows) is x


def test_zero_id_rows_score_as_the_model_without_them(tiny_checkpoints, tmp_path, log):
    with_ids = _scorer(tiny_checkpoints["bert"], tmp_path / "t", log, id_rows=True)
    without = _scorer(tiny_checkpoints["bert"], tmp_path / "t", log, id_rows=False)
    assert with_ids.model.behavior_id_rows.shape == (len(with_ids.behaviors), with_ids.model.upper.hidden_size)
    assert with_ids.model.item_id_rows.shape[0] == len(with_ids.items)
    assert without.model.behavior_id_rows is None
    _, users, items = _requests(log)
    np.testing.assert_allclose(with_ids.score(users, items), without.score(users, items), rtol=1e-6, atol=1e-7)


def test_trained_id_rows_change_scores_and_survive_save_and_load(tiny_checkpoints, tmp_path, log):
    scorer = _scorer(tiny_checkpoints["bert"], tmp_path / "t", log, id_rows=True)
    ctr = BAHECTR(scorer, log)
    rows, users, items = _requests(log)
    before = scorer.score(users, items)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(ctr(ctr.prepare(log, rows)),
                                                                torch.from_numpy(log.label[rows]).float())
    loss.backward()
    assert scorer.model.behavior_id_rows.grad.abs().sum() > 0 and scorer.model.item_id_rows.grad.abs().sum() > 0
    with torch.no_grad():
        scorer.model.behavior_id_rows.add_(torch.randn_like(scorer.model.behavior_id_rows))
        scorer.model.item_id_rows.add_(torch.randn_like(scorer.model.item_id_rows))
    trained = scorer.score(users, items)
    assert np.abs(trained - before).max() > 1e-3
    scorer.save_pretrained(tmp_path / "scorer")
    loaded = BAHEScorer.from_pretrained(tmp_path / "scorer", device="cpu")
    assert loaded.config.model.id_rows
    torch.testing.assert_close(loaded.model.behavior_id_rows, scorer.model.behavior_id_rows)
    np.testing.assert_allclose(loaded.score(users, items), trained, rtol=1e-6, atol=1e-7)


def test_held_out_items_read_their_text_alone(tiny_checkpoints, tmp_path, log):
    scorer = _scorer(tiny_checkpoints["bert"], tmp_path / "t", log, id_rows=True)
    ctr = BAHECTR(scorer, log)
    with torch.no_grad():
        scorer.model.behavior_id_rows.normal_()
        scorer.model.item_id_rows.normal_()
    held = log.item_ids[:3]
    give_unseen_bucket(ctr, held)
    assert scorer.model.behavior_id_rows[torch.from_numpy(ctr.behavior_row[held])].abs().sum() == 0
    assert scorer.model.item_id_rows[torch.from_numpy(ctr.item_row[held])].abs().sum() == 0
    others = np.setdiff1d(log.item_ids, held)
    assert scorer.model.item_id_rows[torch.from_numpy(ctr.item_row[others])].abs().sum() > 0


def test_the_sequential_id_model_takes_no_second_id_rows(tiny_checkpoints, tmp_path, log):
    scorer = _scorer(tiny_checkpoints["bert"], tmp_path / "t", log, id_rows=True)
    model = SequentialIdCTR.from_scorer(scorer, log, log.examples[:50])
    assert not model.config.id_rows and model.model.behavior_id_rows is None


def test_an_update_grows_both_id_tables_with_zeros_and_the_grown_model_saves(tiny_checkpoints, tmp_path, log):
    from engine.training.loops.update import grown_model, scorer_with
    scorer = _scorer(tiny_checkpoints["bert"], tmp_path / "t", log, id_rows=True)
    with torch.no_grad():
        scorer.model.item_id_rows.normal_()
        scorer.model.behavior_id_rows.normal_()
    items, behaviors = scorer.model.item_id_rows.shape[0], scorer.model.behavior_id_rows.shape[0]
    grown = grown_model(scorer.model, items + 4, behaviors + 3)
    for name, trained, new in (("item_id_rows", items, 4), ("behavior_id_rows", behaviors, 3)):
        rows = getattr(grown, name)
        assert rows.shape[0] == trained + new and isinstance(rows, torch.nn.Parameter), name
        torch.testing.assert_close(rows[:trained], getattr(scorer.model, name))
        assert rows[trained:].abs().sum() == 0, f"new {name} start at zero: their text alone"
        assert getattr(scorer.model, name).shape[0] == trained, "the current model is left as it was"
    with pytest.raises(ValueError, match="behavior table has"):
        grown_model(scorer.model, items, behaviors - 1)

    scorer.behaviors.append(["a behavior appended by the update", "another", "and a third"])
    scorer.items.append([f"new item {i}" for i in range(4)])
    scorer_with(scorer, grown, scorer.behaviors, scorer.items).save_pretrained(tmp_path / "grown")
    loaded = BAHEScorer.from_pretrained(tmp_path / "grown", device="cpu")
    torch.testing.assert_close(loaded.model.behavior_id_rows, grown.behavior_id_rows)
    torch.testing.assert_close(loaded.model.item_id_rows, grown.item_id_rows)


def _dropout_scorer(checkpoint: Path, tables: Path, log, share: float) -> BAHEScorer:
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=16, count_features=False,
                                            id_rows=True, item_id_dropout=share))
    torch.manual_seed(0)
    return BAHEScorer.create(checkpoint, behavior_texts=log.item_id_texts, item_texts=log.item_id_texts,
                             tables_dir=tables, config=config, device="cpu", progress=False)


def test_item_id_dropout_must_be_a_share_below_one():
    with pytest.raises(ValueError, match="item_id_dropout"):
        ModelConfig(sequence_names=("watched",), item_id_dropout=1.0)
    with pytest.raises(ValueError, match="item_id_dropout"):
        ModelConfig(sequence_names=("watched",), item_id_dropout=-0.1)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_item_id_dropout_trains_the_unseen_bucket_and_only_in_training(tiny_checkpoints, tmp_path, log, share):
    scorer = _dropout_scorer(tiny_checkpoints["bert"], tmp_path / "t", log, share)
    ctr = BAHECTR(scorer, log)
    rows, _, _ = _requests(log, 200)
    torch.manual_seed(3)
    batch = ctr.prepare(log, rows)
    dropped = torch.zeros(rows.size, dtype=torch.bool) if batch.item_keys is None else batch.item_keys != batch.item_rows
    assert 0.3 < dropped.float().mean() < 0.7 if share else not dropped.any()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(ctr(batch), torch.from_numpy(log.label[rows]).float())
    loss.backward()
    unseen_grad = scorer.model.side.item_id.weight.grad[-1].abs().sum()
    assert (unseen_grad > 0) == bool(share), "only dropped targets train the unseen item-id bucket"
    kept = torch.unique(batch.item_rows[~dropped])
    only_dropped = torch.from_numpy(np.setdiff1d(batch.item_rows[dropped].numpy(), kept.numpy()))
    if share:  # an item all of whose targets were dropped gets no gradient in its own id rows
        assert only_dropped.numel() > 0
        assert scorer.model.item_id_rows.grad[only_dropped].abs().sum() == 0
        assert scorer.model.side.item_id.weight.grad[only_dropped].abs().sum() == 0
    assert scorer.model.item_id_rows.grad[kept].abs().sum() > 0
    ctr.eval()
    assert ctr.prepare(log, rows).item_keys is None, "scoring reads every item's own id"


def test_a_dropped_target_scores_as_a_held_out_item(tiny_checkpoints, tmp_path, log):
    """What dropout trains is what held-out items are scored with (give_unseen_bucket)."""
    scorer = _dropout_scorer(tiny_checkpoints["bert"], tmp_path / "t", log, 0.5)
    ctr = BAHECTR(scorer, log).eval()
    with torch.no_grad():
        scorer.model.item_id_rows.normal_()
        scorer.model.side.item_id.weight.normal_()
    rows, _, _ = _requests(log)
    batch = ctr.prepare(log, rows)
    own = ctr(batch)
    batch.item_keys = torch.full_like(batch.item_rows, UNSEEN_ITEM)
    with torch.no_grad():
        as_unseen = ctr(batch)
        give_unseen_bucket(ctr, np.unique(log.item[rows]))
        held_out = ctr(ctr.prepare(log, rows))
    assert (own - as_unseen).abs().max() > 1e-4
    torch.testing.assert_close(as_unseen, held_out)


@pytest.mark.parametrize("stream", [False, True])
def test_bahe_train_trains_and_saves_id_rows_and_item_id_dropout(tiny_checkpoints, tmp_path, stream):
    """The MovieLens-1M headline model (id rows, optionally item-id dropout) from `bahe train`, in memory and
    streamed: the saved scorer says so and its id rows moved from their zero start."""
    from engine import cli
    out = tmp_path / "run"
    more = (["--stream", str(tmp_path / "work"), "--shards", "2", "--steps-per-shard", "2", "--eval-per-shard", "20"]
            if stream else ["--train-examples", "120", "--val-examples", "30", "--test-examples", "40"])
    cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--device", "cpu", "--id-rows",
              "--item-id-dropout", "0.1", *more])
    scorer = BAHEScorer.from_pretrained(out / "scorer", device="cpu")
    assert scorer.config.model.id_rows and scorer.config.model.item_id_dropout == 0.1
    assert scorer.model.behavior_id_rows.abs().sum() > 0 and scorer.model.item_id_rows.abs().sum() > 0


def test_bahe_train_refuses_an_item_id_dropout_outside_0_1_before_writing(tmp_path):
    from engine import cli
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"bahe train: item_id_dropout must be in \[0, 1\), got 1.5"):
        cli.main(["train", "--data", str(FIXTURE), "--out", str(out), "--item-id-dropout", "1.5"])
    assert not out.exists()
