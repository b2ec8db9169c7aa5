"""BAHE's feature block: what BAHE hands to a ranker a team already runs (LightGBM, DCN, a TorchRec model), per
(user, item) example. One definition for the offline export of a log (engine.training.export, `bahe features`)
and the online API (engine.export.online), so both produce the same columns in the same order.

Columns of BLOCK_VERSION 1, in order (n sequences, width w = the model's hidden size d, or the projection's p):
  bahe_user_<seq>_<j>        the sequence's pooled vector (the upper layers over its window), n x w
  bahe_item_<j>              the item tower's vector, w
  bahe_cos_<seq>             cosine(sequence vector, item vector), n: the head's similarity columns, taken at full
                             width before any projection (`engine.model.head.sequence_item_cosines`)
  bahe_similar_<kind>_<seq>_t<tau>   the similarity-weighted counts from the frozen ABE rows, log1p and share per
                             sequence and temperature (`engine.features.similarity`): the head's columns, 2 n k
  bahe_logit                 BAHE's own click logit, before any calibration

Projection (optional, the vectors only): "random", a fixed Gaussian (d, p) matrix with N(0, 1/p) entries drawn from a
seed (inner products kept in expectation, Johnson-Lindenstrauss); or "pca", the top p principal directions of the
scorer's item vectors (unsupervised: no label is read). Either way the matrix (and PCA's mean) is stored in the
parquet file's metadata, so the online API applies exactly the same map (`Projection.from_metadata`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.features.similarity import similarity_feature_names
from weights.atomic import atomic_write

__all__ = ["BLOCK_VERSION", "METADATA_KEY", "Projection", "block_names", "block_metadata", "assemble", "write_block",
           "read_block"]

BLOCK_VERSION = 1
METADATA_KEY = b"bahe.feature_block"
PROJECTIONS = ("none", "random", "pca")


@dataclass(frozen=True)
class Projection:
    """x -> (x - mean) @ matrix for the block's vectors; kind "none" keeps them as they are. matrix (d, p) float32,
    mean (d,) float32 (zeros but for PCA); seed: the random projection's."""
    kind: str = "none"
    matrix: np.ndarray | None = None
    mean: np.ndarray | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROJECTIONS:
            raise ValueError(f"projection kind must be one of {PROJECTIONS}, got {self.kind!r}")
        if (self.kind == "none") != (self.matrix is None):
            raise ValueError(f"a {self.kind!r} projection {'takes no' if self.kind == 'none' else 'needs a'} matrix")
        if self.matrix is not None and (self.matrix.ndim != 2 or self.mean is None
                                        or self.mean.shape != (self.matrix.shape[0],)):
            raise ValueError(f"projection matrix must be (d, p) with a (d,) mean, got {self.matrix.shape} and "
                             f"{None if self.mean is None else self.mean.shape}")

    @classmethod
    def random(cls, d: int, p: int, seed: int = 0) -> Projection:
        """A fixed Gaussian map d -> p, entries N(0, 1/p), drawn from `seed` (numpy's default generator)."""
        _check_width(d, p)
        matrix = np.random.default_rng(seed).normal(0.0, 1.0 / np.sqrt(p), size=(d, p)).astype(np.float32)
        return cls("random", matrix, np.zeros(d, np.float32), seed)

    @classmethod
    def pca(cls, vectors: np.ndarray, p: int) -> Projection:
        """The top `p` principal directions of `vectors` (N, d) (centered; each direction's sign fixed so its
        largest entry is positive, so the map is reproducible)."""
        vectors = np.asarray(vectors, dtype=np.float64)
        _check_width(vectors.shape[1], p)
        if vectors.shape[0] < 2:
            raise ValueError(f"PCA needs at least 2 vectors, got {vectors.shape[0]}")
        mean = vectors.mean(axis=0)
        _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
        directions = vt[:p]
        if directions.shape[0] < p:
            raise ValueError(f"PCA to width {p} needs at least {p} vectors, got {vectors.shape[0]}")
        sign = np.sign(directions[np.arange(p), np.abs(directions).argmax(axis=1)])
        return cls("pca", (directions * sign[:, None]).T.astype(np.float32), mean.astype(np.float32))

    def width(self, d: int) -> int:
        """The vectors' width in the block for a model of hidden size d."""
        if self.matrix is None:
            return d
        if self.matrix.shape[0] != d:
            raise ValueError(f"the projection maps width {self.matrix.shape[0]}, the model's vectors have width {d}")
        return self.matrix.shape[1]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., d) -> (..., w) float32."""
        if self.matrix is None:
            return np.asarray(x, dtype=np.float32)
        self.width(x.shape[-1])
        return ((np.asarray(x, dtype=np.float32) - self.mean) @ self.matrix).astype(np.float32)

    def to_metadata(self) -> dict:
        return {"kind": self.kind, "seed": self.seed,
                "matrix": None if self.matrix is None else self.matrix.tolist(),
                "mean": None if self.mean is None else self.mean.tolist()}

    @classmethod
    def from_metadata(cls, meta: dict) -> Projection:
        """The projection a block file records (its metadata's "projection")."""
        if not isinstance(meta, dict) or "kind" not in meta:
            raise ValueError(f"projection metadata must be a dict with a 'kind', got {type(meta).__name__}")
        matrix = None if meta.get("matrix") is None else np.asarray(meta["matrix"], dtype=np.float32)
        mean = None if meta.get("mean") is None else np.asarray(meta["mean"], dtype=np.float32)
        return cls(meta["kind"], matrix, mean, meta.get("seed"))


def _check_width(d: int, p: int) -> None:
    if not 1 <= p <= d:
        raise ValueError(f"projection width must be in [1, {d}] (the model's hidden size), got {p}")


def block_names(sequence_names: tuple[str, ...], temperatures: tuple[float, ...], width: int) -> list[str]:
    """The block's column names, in order (module docstring)."""
    return ([f"bahe_user_{name}_{j}" for name in sequence_names for j in range(width)]
            + [f"bahe_item_{j}" for j in range(width)] + [f"bahe_cos_{name}" for name in sequence_names]
            + [f"bahe_{name}" for name in similarity_feature_names(sequence_names, temperatures)] + ["bahe_logit"])


def block_metadata(sequence_names: tuple[str, ...], temperatures: tuple[float, ...], hidden_size: int,
                   projection: Projection) -> dict:
    """What defines a block's columns: version, names, the model's sequences, temperatures and width, the
    projection. Two blocks with equal metadata hold the same features (of possibly different scorers)."""
    width = projection.width(hidden_size)
    return {"block_version": BLOCK_VERSION, "feature_names": block_names(sequence_names, temperatures, width),
            "sequence_names": list(sequence_names), "temperatures": list(temperatures), "hidden_size": hidden_size,
            "width": width, "projection": projection.to_metadata()}


def assemble(parts: dict, projection: Projection) -> np.ndarray:
    """(P, F) float32 block rows from the head's inputs `parts` (`BAHEScorer.score_parts`, or the timeline forward
    of engine.training.export): user (P, n, d), item (P, d), cosines (P, n), similar (P, 2 n k) or None, logits (P,)."""
    user, item = projection.apply(parts["user"]), projection.apply(parts["item"])
    columns = [user.reshape(user.shape[0], user.shape[1] * user.shape[2]), item,
               np.asarray(parts["cosines"], np.float32)]
    if parts.get("similar") is not None:
        columns.append(np.asarray(parts["similar"], np.float32))
    columns.append(np.asarray(parts["logits"], np.float32)[:, None])
    return np.concatenate(columns, axis=1)


def write_block(path: str | Path, keys: dict[str, np.ndarray], values: np.ndarray, names: list[str],
                metadata: dict) -> None:
    """Write a parquet file: the `keys` columns (user_id, item_id, timestamp, ...) then the block (P, F) under
    `names`, with `metadata` (JSON) under METADATA_KEY. Atomic: a crash leaves the old file or none."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"block values must be (P, {len(names)}) for its {len(names)} names, got {values.shape}")
    columns = {**{k: pa.array(v) for k, v in keys.items()}, **{n: pa.array(values[:, j]) for j, n in enumerate(names)}}
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    with atomic_write(path) as handle:
        pq.write_table(table, handle)


def read_block(path: str | Path) -> tuple[object, dict]:
    """(pandas DataFrame, metadata dict) of a file `write_block` wrote; ValueError for a parquet file without the
    block's metadata."""
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path}: no BAHE feature block metadata ({METADATA_KEY.decode()}); not written by "
                         "`bahe features`")
    return table.to_pandas(), json.loads(raw)
