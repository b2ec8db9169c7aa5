"""The feature block for live requests (engine.export.online, engine.export.block): its columns are what the head
reads (the logit gives `score`'s probability, the cosines are the vectors' own), a pair's block does not depend on
the batch, projections are reproducible and travel in a block file's metadata, and bad inputs are refused."""
import numpy as np
import pandas as pd
import pytest

from engine.export.block import Projection, assemble, block_names, read_block, write_block
from engine.export.online import FeatureProvider
from tests.serving.test_scorer import ITEMS, make_scorer, random_users


@pytest.fixture
def scorer(tiny_checkpoints, tmp_path):
    return make_scorer(tiny_checkpoints["llama"], tmp_path)


def test_the_block_is_what_the_head_reads(scorer):
    rng = np.random.default_rng(0)
    users = random_users(rng, 7)
    items = [ITEMS[i] for i in rng.integers(0, len(ITEMS), 7)]
    provider = FeatureProvider(scorer)
    block = provider.features(users, items)
    d, n = scorer.model.upper.hidden_size, 3
    names = provider.names
    assert block.shape == (7, len(names)) and block.dtype == np.float32 and names[-1] == "bahe_logit"
    assert names == block_names(("click", "buy", "search"), scorer.config.model.similarity_temperatures, d)
    np.testing.assert_allclose(1 / (1 + np.exp(-block[:, -1].astype(np.float64))), scorer.score(users, items),
                               rtol=0, atol=1e-6)
    user = block[:, :n * d].reshape(7, n, d).astype(np.float64)
    item = block[:, n * d:(n + 1) * d].astype(np.float64)
    cos = (user * item[:, None]).sum(-1) / np.linalg.norm(user, axis=-1) / np.linalg.norm(item, axis=-1)[:, None]
    np.testing.assert_allclose(block[:, (n + 1) * d:(n + 1) * d + n], cos, rtol=0, atol=1e-5)
    similar = block[:, (n + 1) * d + n:-1]
    assert similar.shape[1] == 2 * n * len(scorer.config.model.similarity_temperatures) and (similar >= 0).all()


def test_a_pairs_block_does_not_depend_on_the_batch(scorer):
    rng = np.random.default_rng(1)
    users = random_users(rng, 6)
    items = [ITEMS[i] for i in rng.integers(0, len(ITEMS), 6)]
    provider = FeatureProvider(scorer, Projection.random(scorer.model.upper.hidden_size, 4, seed=3))
    together = provider.features(users, items)
    alone = np.concatenate([provider.features([u], [i]) for u, i in zip(users, items)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert provider.features([], []).shape == (0, len(provider.names))


def test_projections_are_reproducible_and_travel_in_the_file(scorer, tmp_path):
    d = scorer.model.upper.hidden_size
    first, again = Projection.random(d, 5, seed=7), Projection.random(d, 5, seed=7)
    assert np.array_equal(first.matrix, again.matrix) and not np.array_equal(first.matrix,
                                                                             Projection.random(d, 5, seed=8).matrix)
    vectors = np.random.default_rng(0).normal(size=(40, d))
    pca = Projection.pca(vectors, 4)
    assert np.array_equal(pca.matrix, Projection.pca(vectors, 4).matrix)
    np.testing.assert_allclose(pca.matrix.T @ pca.matrix, np.eye(4), atol=1e-5)
    provider = FeatureProvider(scorer, pca)
    rng = np.random.default_rng(2)
    users, items = random_users(rng, 3), ITEMS[:3]
    block = provider.features(users, items)
    path = tmp_path / "block.parquet"
    write_block(path, {"row": np.arange(3)}, block, provider.names, provider.metadata)
    frame, meta = read_block(path)
    assert list(frame.columns) == ["row", *provider.names] and meta["projection"]["kind"] == "pca"
    back = Projection.from_metadata(meta["projection"])
    np.testing.assert_array_equal(assemble(scorer.score_parts(users, items), back), block)
    scorer.save_pretrained(tmp_path / "scorer")
    opened = FeatureProvider.open(tmp_path / "scorer", like=path, device="cpu")
    assert opened.projection.kind == "pca" and opened.names == provider.names and opened.version
    np.testing.assert_allclose(opened.features(users, items), block, rtol=1e-5, atol=1e-5)


def test_bad_projections_and_files_are_refused(scorer, tmp_path):
    d = scorer.model.upper.hidden_size
    with pytest.raises(ValueError, match="projection width"):
        Projection.random(d, d + 1)
    with pytest.raises(ValueError, match="projection kind"):
        Projection("svd")
    with pytest.raises(ValueError, match="width"):
        Projection.random(d + 2, 3).apply(np.zeros((2, d), np.float32))
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"a": [1.0]}).to_parquet(plain)
    with pytest.raises(ValueError, match="no BAHE feature block metadata"):
        read_block(plain)
    with pytest.raises(ValueError, match="block values"):
        write_block(tmp_path / "x.parquet", {}, np.zeros((2, 3), np.float32), ["a", "b"], {})
    assert not (tmp_path / "x.parquet").exists()
