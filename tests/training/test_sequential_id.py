"""The sequential id model: BAHE's architecture over learned item ids. It trains on the MovieLens fixture; items
training never saw take the one unseen bucket; timeline training equals the per-example forward; a target's logit
never reads the future; and none of its weights are the checkpoint's."""
import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, ScorerConfig
from engine.backbone.split import UpperEncoder
from engine.config import ModelConfig
from engine.features.side_features import count_features
from engine.model.bahe_model import PackedBatch
from engine.training.data.example_features import category_batch, past_counts, recent_counts
from engine.training.loops.batching import interleave
from engine.training.loops.ctr_models import rows_by_user
from engine.training.loops.sequential_id import SequentialIdCTR, training_items
from engine.training.loops.train import TrainConfig, fit
from tests.synthetic_logs import rewrite_future, tiny_movielens
from weights.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def log():
    return tiny_movielens()


def _early(log, share=0.5):
    """Training examples: those before the `share` quantile of example timestamps (later ones hold new items)."""
    examples = log.examples
    cut = np.quantile(log.timestamp[examples], share)
    return examples[log.timestamp[examples] < cut]


def _model(folder, log, train_rows, *, max_behaviors=1000, window_step=0, count_features=True,
           categorical=("user_id", "gender"), perturb=True):
    config = ModelConfig(sequence_names=log.sequence_names, max_behaviors=max_behaviors, window_step=window_step,
                         count_features=count_features, categorical_features=categorical, categorical_buckets=512,
                         head_hidden=(16, 8))
    torch.manual_seed(0)
    like = UpperEncoder.from_checkpoint(Checkpoint(folder), 2, causal=True)
    model = SequentialIdCTR(like, config, log, train_rows)
    if perturb:  # positions, empty vectors and head away from their initial values, so every part counts
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            if model.model.side.categories:
                model.model.side.category_seen[::2] = True
    return model


def _per_example(model: SequentialIdCTR, log, rows: np.ndarray) -> torch.Tensor:
    """Each target alone through BAHEModel.forward on its own window (the serving-path function)."""
    config = model.config
    out = []
    for row in rows:
        seqs = log.sequences([row], config.max_behaviors, config.history_step)
        values, offsets = interleave([seqs[name] for name in config.sequence_names])
        user_counts, item_counts = past_counts(log, np.array([row]))
        recent = recent_counts(log, np.array([row]), config.recent_events)
        batch = PackedBatch(torch.from_numpy(model.item_rows(values)), torch.from_numpy(offsets),
                            torch.from_numpy(model.item_rows(log.item[[row]])),
                            dense=torch.from_numpy(count_features(user_counts, item_counts, recent)),
                            categories=category_batch(model.model.side, config, log, np.array([row]), training=False))
        out.append(model.model(model.embedding, model.embedding, batch))
    return torch.cat(out)


@pytest.mark.parametrize("max_behaviors, window_step", [(1000, 0), (4, 1), (5, 3)])
def test_timeline_equals_per_example(family_checkpoint, log, max_behaviors, window_step):
    _, folder = family_checkpoint
    model = _model(folder, log, _early(log), max_behaviors=max_behaviors, window_step=window_step).eval()
    rows = rows_by_user(log.examples, log, np.random.default_rng(0))[:90]
    assert (model.item_rows(log.item[rows]) == model.unseen_row).any()  # unseen targets are in the batch
    with torch.no_grad():
        timeline = model(model.prepare(log, rows))
        single = _per_example(model, log, rows)
    assert timeline.shape == (rows.size,)
    torch.testing.assert_close(timeline, single, rtol=1e-5, atol=1e-5)


def test_vocabulary_is_the_training_items_and_the_rest_take_the_unseen_bucket(tiny_checkpoints, log):
    train = _early(log)
    model = _model(tiny_checkpoints["bert"], log, train, perturb=False)
    vocabulary = set(model.items.tolist())
    # seen = training targets and the behaviors of their histories (strictly earlier events of the user)
    expected = set(log.item[train].tolist())
    for name, ragged in log.sequences(train, None).items():
        expected |= set(ragged.values.tolist())
    assert vocabulary == expected
    later = np.setdiff1d(log.item[log.examples], model.items)
    assert later.size > 0  # the fixture's later examples hold items training never saw
    assert model.embedding.shape[0] == len(vocabulary) + 1
    np.testing.assert_array_equal(model.item_rows(model.items), np.arange(len(vocabulary)))
    assert (model.item_rows(later) == model.unseen_row).all()
    assert model.item_rows(np.array([10 ** 9]))[0] == model.unseen_row  # an id no log has
    # in a batch, unseen targets and unseen behaviors both read the unseen row
    rows = log.examples[np.isin(log.item[log.examples], later)][:20]
    batch = model.prepare(log, np.sort(rows))
    assert (batch.item_rows == model.unseen_row).all()
    assert (batch.behavior_rows == model.unseen_row).any() and (batch.behavior_rows < model.unseen_row).any()


def test_two_unseen_items_score_alike(tiny_checkpoints, log):
    """With no count features (which differ per item), an unseen target is scored as the unseen bucket: two
    different unseen items in the same context get the same logit; a seen item does not."""
    train = _early(log)
    model = _model(tiny_checkpoints["bert"], log, train, count_features=False, categorical=("user_id",)).eval()
    later = np.setdiff1d(log.item_ids, model.items)
    row = int(log.examples[-1])
    logits = []
    for item in (later[0], later[1], model.items[0]):
        items = log.item.copy()
        items[row] = item
        other = type(log)(log.user, items, log.timestamp, log.label, log.membership, log.item_texts,
                          log.sequence_names, log.min_history)
        with torch.no_grad():
            logits.append(model(model.prepare(other, np.array([row]))))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    assert not torch.allclose(logits[0], logits[2])


@pytest.mark.parametrize("max_behaviors", [1000, 4])
def test_no_leak_from_the_future(tiny_checkpoints, log, max_behaviors):
    """A target's logit is unchanged when every event at or after its moment is redrawn, in the same timeline
    batch as the user's later targets (which read the rewritten events)."""
    model = _model(tiny_checkpoints["llama"], log, _early(log), max_behaviors=max_behaviors,
                   categorical=("user_id",)).eval()
    rng = np.random.default_rng(0)
    users, counts = np.unique(log.user[log.examples], return_counts=True)
    user_rows = log.examples[log.user[log.examples] == users[np.argmax(counts)]]
    for row in user_rows[[3, user_rows.size // 2]]:
        rewritten = rewrite_future(log, int(row), rng)
        with torch.no_grad():
            before = model(model.prepare(log, user_rows))
            after = model(model.prepare(rewritten, user_rows))
        at = int(np.flatnonzero(user_rows == row)[0])
        torch.testing.assert_close(after[:at + 1], before[:at + 1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(after[at + 1:], before[at + 1:])  # the later targets did change


def test_trains_on_the_fixture_from_fresh_weights(tiny_checkpoints, log, tmp_path):
    """Built from a BAHE scorer: the same upper architecture, none of its weights; fit trains every part (the
    id rows of training items, the upper layers, the head), and the training loss falls."""
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, head_hidden=(16, 8),
                                            categorical_features=("user_id",), categorical_buckets=512))
    texts = log.item_id_texts
    scorer = BAHEScorer.create(tiny_checkpoints["bert"], behavior_texts=texts, item_texts=texts,
                               tables_dir=tmp_path / "tables", config=config, device="cpu", progress=False)
    train = _early(log, 0.7)
    val = np.setdiff1d(log.examples, train)
    torch.manual_seed(0)
    model = SequentialIdCTR.from_scorer(scorer, log, train)
    pretrained = dict(scorer.model.upper.named_parameters())
    upper = dict(model.model.upper.named_parameters())
    assert upper.keys() == pretrained.keys()
    for name, p in upper.items():
        assert p.shape == pretrained[name].shape
        assert not torch.equal(p, pretrained[name]), name
    assert all(layer.attn.causal for layer in model.model.upper.layers)
    assert model.model.config.similarity_temperatures == () and model.pretrained_parameters() == []
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = fit(model, log, train, val, TrainConfig(epochs=3, patience=3, batch_size=32, norm_batches=2, lr=3e-3,
                                                     progress=False))
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0.0 <= result.best_val_auc <= 1.0
    state = model.state_dict()
    for name in ("embedding", "model.upper.layers.0.attn.qkv.weight", "model.head.linears.0.weight"):
        assert not torch.equal(state[name], initial[name]), name
    seen = torch.from_numpy(model.item_rows(log.item[train]))
    assert not torch.allclose(state["embedding"][seen], initial["embedding"][seen])


def test_extra_columns_join_the_dense_side_features_by_example_row(family_checkpoint, log):
    """A stacked sequential id model (BAHE's exported block fed to it): F more dense columns, taken by example row,
    NaN read as 0; they change its logits; a row the columns lack is named."""
    from engine.training.data.extra_columns import ExtraColumns
    _, folder = family_checkpoint
    train = _early(log)
    rows = rows_by_user(log.examples, log, np.random.default_rng(0))[:60]
    values = np.random.default_rng(1).normal(size=(log.examples.size, 3)).astype(np.float32)
    values[0, 1] = np.nan
    extra = ExtraColumns(log.examples, values, ["bahe_logit", "cos_a", "cos_b"], "BAHE features")
    plain = _model(folder, log, train, perturb=False)
    config, like = plain.config, UpperEncoder.from_checkpoint(Checkpoint(folder), 2, causal=True)
    stacked = SequentialIdCTR(like, config, log, train, extra)
    assert stacked.model.side.counts == plain.model.side.counts + 3
    assert stacked.model.side.width == plain.model.side.width + 3
    batch = stacked.prepare(log, np.sort(np.r_[rows, log.examples[0]]))
    assert batch.dense.shape[1] == plain.model.side.counts + 3 and torch.isfinite(batch.dense).all()
    plain_dense = plain.prepare(log, np.sort(np.r_[rows, log.examples[0]])).dense
    torch.testing.assert_close(batch.dense[:, :plain_dense.shape[1]], plain_dense)
    stacked.eval()
    with torch.no_grad():
        before = stacked(stacked.prepare(log, rows))
        extra.values[:] = 0
        after = stacked(stacked.prepare(log, rows))
    assert (before - after).abs().max() > 1e-4, "the extra columns reach the head"
    fit(stacked, log, train[:200], rows[:40], TrainConfig(epochs=1, batch_size=64, progress=False))
    missing = ExtraColumns(log.examples[1:], values[1:], extra.names, "BAHE features")
    with pytest.raises(ValueError, match=f"BAHE features do not cover example row {log.examples[0]}"):
        SequentialIdCTR(like, config, log, train, missing).prepare(log, log.examples[:5])
