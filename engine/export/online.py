"""The feature block for live requests: a team's ranker asks BAHE for its features of (user, candidate) pairs as
they come, the same columns `bahe features` wrote for its training log (engine.export.block), through the scorer's
serving path (`BAHEScorer.score_parts`: user tower once per distinct user, stored item vectors, the served item
counts). At serving time every behavior a request carries is past, and the served scorer was trained before it:
the live block has no stacking leak to guard against; the offline export does (engine.export.record).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.export.block import BLOCK_VERSION, Projection, assemble, block_metadata, read_block
from engine.export.record import scorer_version
from engine.serving.scorer import BAHEScorer

__all__ = ["FeatureProvider"]


class FeatureProvider:
    """BAHE's feature block of (user, item) pairs for online use. `features` takes `BAHEScorer.score`'s inputs and
    returns (P, F) float32 rows whose columns are `names`; `metadata` describes them (block version, projection,
    scorer version)."""

    def __init__(self, scorer: BAHEScorer, projection: Projection | None = None, *, version: str | None = None) -> None:
        self.scorer, self.projection, self.version = scorer, projection or Projection(), version
        model = scorer.config.model
        self.spec = block_metadata(model.sequence_names, model.similarity_temperatures, scorer.model.upper.hidden_size,
                                   self.projection)

    @classmethod
    def open(cls, folder: str | Path, *, like: str | Path | None = None, projection: Projection | None = None,
             **scorer_options) -> FeatureProvider:
        """The provider of a scorer folder; `like`: a block file `bahe features` wrote, whose projection is used
        (ValueError when this scorer's block would have other columns than the file's)."""
        scorer = BAHEScorer.from_pretrained(folder, **scorer_options)
        if like is not None:
            _, meta = read_block(like)
            if meta.get("block_version") != BLOCK_VERSION:
                raise ValueError(f"{like}: feature block version {meta.get('block_version')}, this engine writes "
                                 f"{BLOCK_VERSION}")
            projection = Projection.from_metadata(meta["projection"])
        provider = cls(scorer, projection, version=scorer_version(folder))
        if like is not None and provider.names != meta["feature_names"]:
            raise ValueError(f"{folder}'s feature block has other columns than {like}'s (other sequences, width or "
                             "temperatures)")
        return provider

    @property
    def names(self) -> list[str]:
        return self.spec["feature_names"]

    @property
    def metadata(self) -> dict:
        return {**self.spec, "scorer_version": self.version}

    def features(self, users: Sequence[dict[str, Sequence[str]]], items: Sequence[str], *,
                 history_counts: Sequence[dict[str, int] | None] | None = None,
                 side_features: Sequence[dict | None] | None = None) -> np.ndarray:
        """(P, F) float32: the block of pairs (users[i], items[i]); inputs as `BAHEScorer.score` takes them."""
        parts = self.scorer.score_parts(users, items, history_counts=history_counts, side_features=side_features)
        return assemble(parts, self.projection)
