"""Timeline training: the logit of every target from one forward per user equals the per-example
forward on that target's own history (its window, positions from 0), for every family."""
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, ModelConfig, ScorerConfig
from engine.features.history_window import window_start
from engine.model.bahe_model import PackedBatch
from engine.features.side_features import count_features
from engine.features.side_features import recent_counts as recent_counts_from_texts
from engine.training.loops.batching import interleave
from engine.training.loops.ctr_models import BAHECTR, rows_by_user
from engine.training.data import load_log
from engine.training.data.example_features import category_batch, past_counts, recent_counts
from engine.training.loops.timeline import prefix_similar

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


@pytest.fixture(scope="module")
def log():
    return load_log(FIXTURE)


def _scorer(folder, tmp_path, log, max_behaviors, window_step=0):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=max_behaviors,
                                            window_step=window_step,
                                            categorical_features=("user_id", "gender"), categorical_buckets=512))
    torch.manual_seed(0)
    texts = log.item_id_texts
    scorer = BAHEScorer.create(folder, behavior_texts=texts, item_texts=texts, tables_dir=tmp_path / "tables",
                               config=config, device="cpu", progress=False)
    with torch.no_grad():  # positions, empty vectors and head away from their initial zeros, so every part counts
        for p in scorer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        scorer.model.item_counts.copy_(torch.randint(0, 50, scorer.model.item_counts.shape))
        scorer.model.side.category_seen[::2] = True  # some values seen in training, others not
    return scorer


def _per_example(ctr: BAHECTR, log, rows: np.ndarray) -> torch.Tensor:
    """Each target alone through the serving forward (BAHEModel.forward)."""
    config = ctr.scorer.config.model
    out = []
    for row in rows:
        seqs = log.sequences([row], config.max_behaviors, config.history_step)
        values, offsets = interleave([seqs[name] for name in config.sequence_names])
        user_counts, item_counts = past_counts(log, np.array([row]))
        recent = recent_counts(log, np.array([row]), config.recent_events)
        batch = PackedBatch(torch.from_numpy(ctr.behavior_row[values]), torch.from_numpy(offsets),
                            torch.from_numpy(ctr.item_row[log.item[[row]]]),
                            dense=torch.from_numpy(count_features(user_counts, item_counts, recent)),
                            categories=category_batch(ctr.model.side, config, log, np.array([row]), training=False))
        out.append(ctr.model(ctr.behavior_table, ctr.item_table, batch))
    return torch.cat(out)


@pytest.mark.parametrize("max_behaviors, window_step", [(1000, 0), (4, 1), (8, 0), (5, 3)])
def test_timeline_equals_per_example(family_checkpoint, tmp_path, log, max_behaviors, window_step):
    family, folder = family_checkpoint
    ctr = BAHECTR(_scorer(folder, tmp_path, log, max_behaviors, window_step), log).eval()
    rows = rows_by_user(log.examples, log, np.random.default_rng(0))[:90]  # several users, parts of others
    with torch.no_grad():
        timeline = ctr(ctr.prepare(log, rows))
        single = _per_example(ctr, log, rows)
    assert timeline.shape == (rows.size,)
    torch.testing.assert_close(timeline, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_behaviors, window_step", [(4, 1), (8, 2), (8, 8)])
def test_one_window_per_user_sequence_and_start(tiny_checkpoints, tmp_path, log, max_behaviors, window_step):
    """Targets share their user's window of a sequence while their window starts agree: the batch packs
    exactly the distinct (user, sequence, start) windows, each at most M long, and each target's prefix fits."""
    ctr = BAHECTR(_scorer(tiny_checkpoints["bert"], tmp_path, log, max_behaviors, window_step), log)
    rows = rows_by_user(log.examples, log, np.random.default_rng(2))[:120]
    batch = ctr.prepare(log, rows)
    before, _ = past_counts(log, rows)
    start = window_start(before, max_behaviors, window_step)
    users = np.unique(log.user[rows], return_inverse=True)[1]
    distinct = {(u, s, int(w)) for u, starts in zip(users, start) for s, w in enumerate(starts)}
    lengths = torch.diff(batch.offsets)
    assert batch.offsets.numel() - 1 == len(distinct)
    assert int(lengths.max()) <= max_behaviors and (before > max_behaviors).any()
    np.testing.assert_array_equal(batch.prefix.numpy(), before - start)
    assert bool((batch.prefix <= lengths[batch.sequence]).all())
    assert len(distinct) < rows.size * 3 or window_step == 1


def test_timeline_needs_causal_upper_layers(tiny_checkpoints, tmp_path, log):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, attention="family"))
    texts = log.item_id_texts
    scorer = BAHEScorer.create(tiny_checkpoints["bert"], behavior_texts=texts, item_texts=texts,
                               tables_dir=tmp_path / "t", config=config, device="cpu", progress=False)
    with pytest.raises(ValueError, match="causal"):
        BAHECTR(scorer, log)


def test_recent_counts_from_texts_equal_the_logs(log):
    """The scorer's recent counts (texts of the widest sequence's last events, looked up in each sequence)
    equal the trainer's (the log's last events and their memberships) on MovieLens, where 'watched' holds every
    event and a user rates a movie once."""
    rows = log.examples
    texts = log.sequence_texts(rows, None)
    from_texts = recent_counts_from_texts([[t[name] for name in log.sequence_names] for t in texts], 10, 3)
    np.testing.assert_array_equal(from_texts, recent_counts(log, rows, 10))
    assert from_texts[:, 0].max() > 0 and from_texts[:, 2].max() == 10


def test_prefix_similarity_equals_the_serving_path(tiny_checkpoints, tmp_path, log):
    """The similarity features of every target's prefix (timeline) equal BAHEModel.similar on its own batch."""
    ctr = BAHECTR(_scorer(tiny_checkpoints["bert"], tmp_path, log, 1000), log).eval()
    rows = rows_by_user(log.examples, log, np.random.default_rng(1))[:60]
    config = ctr.scorer.config.model
    with torch.no_grad():
        timeline = prefix_similar(ctr.model, ctr.behavior_table, ctr.item_table, ctr.prepare(log, rows))
        single = []
        for row in rows:
            seqs = log.sequences([row], config.max_behaviors, config.history_step)
            values, offsets = interleave([seqs[name] for name in config.sequence_names])
            batch = PackedBatch(torch.from_numpy(ctr.behavior_row[values]), torch.from_numpy(offsets),
                                torch.from_numpy(ctr.item_row[log.item[[row]]]))
            single.append(ctr.model.similar(ctr.behavior_table, ctr.item_table, batch))
    single = torch.cat(single)
    assert timeline.shape == single.shape == (rows.size, len(config.sequence_names), len(config.similarity_temperatures))
    assert single.sum() > 0
    torch.testing.assert_close(timeline, single, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("max_behaviors, window_step, id_rows, table_dtype",
                         [(1000, 0, False, "float32"), (8, 0, False, "float32"), (5, 2, False, "float32"),
                          (8, 0, True, "float32"), (8, 0, True, "int8")])
def test_timeline_equals_the_scorer_on_whole_histories(tiny_checkpoints, tmp_path, log, max_behaviors, window_step,
                                                       id_rows, table_dtype):
    """What is trained is what is served: the scorer, given each target's whole history as texts, cuts the same
    windows itself and returns sigmoid of the timeline logit (a model without the count features, whose item
    side the scorer takes from its snapshot rather than the log's past); with learned id rows too, and over int8
    tables (the timeline's similarity counts read the rows through the dequantizing gather, as serving does)."""
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2, table_dtype=table_dtype),
                          model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=max_behaviors,
                                            window_step=window_step, count_features=False, id_rows=id_rows))
    torch.manual_seed(0)
    texts = log.item_id_texts
    scorer = BAHEScorer.create(tiny_checkpoints["bert"], behavior_texts=texts, item_texts=texts,
                               tables_dir=tmp_path / "tables", config=config, device="cpu", progress=False)
    with torch.no_grad():
        for p in scorer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ctr = BAHECTR(scorer, log).eval()
    rows = rows_by_user(log.examples, log, np.random.default_rng(3))[:80]
    with torch.no_grad():
        timeline = torch.sigmoid(ctr(ctr.prepare(log, rows))).numpy()
    served = scorer.score(log.sequence_texts(rows, None), log.target_texts(rows))
    assert max(len(seq) for user in log.sequence_texts(rows, None) for seq in user.values()) > max_behaviors \
        or max_behaviors == 1000
    np.testing.assert_allclose(served, timeline, rtol=1e-5, atol=1e-6)
