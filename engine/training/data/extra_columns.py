"""Columns computed outside a model for a log's examples (BAHE's exported feature block, engine.export), joined
to a peer's own inputs by example row: LightGBM's features (engine.training.baselines.lightgbm_peers) or the
sequential id model's dense side columns (engine.training.loops.sequential_id)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ExtraColumns"]


@dataclass(frozen=True)
class ExtraColumns:
    """Columns computed elsewhere for the log's examples (BAHE's feature block, engine.export), joined to the peer's
    own by example row: rows (E,) ascending, values (E, F), names (F,); label names the set in the model's name."""
    rows: np.ndarray
    values: np.ndarray
    names: list[str]
    label: str = "extra features"

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(B, F) float32 values of example `rows`; ValueError naming a row the columns do not cover."""
        at = np.minimum(np.searchsorted(self.rows, rows), max(self.rows.size - 1, 0))
        missing = np.flatnonzero(self.rows[at] != rows) if self.rows.size else np.arange(rows.size)
        if missing.size:
            raise ValueError(f"the {self.label} do not cover example row {int(rows[missing[0]])} "
                             f"({missing.size} rows missing)")
        return np.asarray(self.values[at], dtype=np.float32)
