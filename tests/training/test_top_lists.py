"""engine.training.studies.top_lists: a probe scores as the real event at its (user, item, moment) would, for the
classic features and a CTR model; list selection skips rated items; the overlap figures on known lists."""
import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.training.baselines.classic import classic_features
from engine.training.data.movielens_1m import load_movielens_1m
from engine.training.loops.ctr_models import SideOnlyCTR
from engine.training.loops.train import predict
from engine.training.studies.top_lists import (anchor_rows, model_top_overlap, neural_scores, overlap, probe_log,
                                               top_lists)
from tests.ml1m_fixture import write_ml1m_files


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return load_movielens_1m(write_ml1m_files(tmp_path_factory.mktemp("ml-1m")))


def test_probes_score_like_the_real_events(log):
    test = log.split().test
    anchors = anchor_rows(log, test, 4, seed=1)
    assert anchors.size == 4 and np.unique(log.user[anchors]).size == 4 and np.isin(anchors, test).all()
    for a in anchors.tolist():  # the first test example of its user
        assert log.timestamp[a] == log.timestamp[test[log.user[test] == log.user[a]]].min()
    moment = int(log.timestamp[test].min())
    probe, rows, rated = probe_log(log, anchors, moment)
    assert probe.num_events == log.num_events + rows.size and rows.shape == (4, log.item_ids.size)
    assert (probe.user[rows] == log.user[anchors][:, None]).all() and (probe.item[rows] == log.item_ids).all()
    assert (probe.timestamp[rows] == moment).all()
    torch.manual_seed(0)
    model = SideOnlyCTR(ModelConfig(sequence_names=log.sequence_names, head_hidden=(8,)), log)
    some = rows[:, ::7]
    classic, scores = classic_features(probe, some.ravel())[0], neural_scores(model)(probe, some.ravel())
    assert model.counts.log is log  # restored after scoring the probes
    for k, (a, j) in enumerate(np.ndindex(*some.shape)):  # the same in a log holding only its own user's probes
        single, (own,), _ = probe_log(log, anchors[[a]], moment)
        own = own[[j * 7]]
        np.testing.assert_array_equal(classic[k], classic_features(single, own)[0][0])
        np.testing.assert_allclose(scores[k], predict(model, single, own)[0], rtol=1e-6)
    for a, row in enumerate(anchors.tolist()):
        before = log.item[(log.user == log.user[row]) & (log.timestamp < moment)]
        assert set(log.item_ids[rated[a]].tolist()) == set(before.tolist())
    got = model_top_overlap(neural_scores(model), probe, rows, rated, k=3)
    assert got.users == 4 and got.k == 3 and 0 <= got.pairwise <= 1


def test_top_lists_skip_excluded_columns():
    scores = np.array([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]])
    excluded = np.array([[True, False, False, False], [False, False, False, True]])
    np.testing.assert_array_equal(top_lists(scores, excluded, 2), [[1, 3], [2, 1]])


def test_overlap_figures():
    same = overlap(np.array([[1, 2, 3]] * 4))
    assert (same.pairwise, same.distinct, same.top_item_share) == (1.0, 3, 1.0)
    apart = overlap(np.array([[1, 2], [3, 4], [5, 6]]))
    assert (apart.pairwise, apart.distinct) == (0.0, 6)
    half = overlap(np.array([[1, 2], [1, 3]]))  # one shared item of two
    assert half.pairwise == 0.5 and half.top_item_share == 1.0 and "0.500 pairwise overlap" in str(half)
