"""Configuration, one dataclass per concern, with defaults that work out of the box. Every field is
checked for its type and range when a config is made (also from a scorer.json): ValueError naming it."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from engine.features.history_window import window_start

POOLINGS = ("mean", "mean_after_first")
HEAD_ACTIVATIONS = ("relu", "gelu", "silu")  # the keys of kernels.ctr_mlp.ACTIVATIONS
TABLE_DTYPES = ("float32", "float16", "bfloat16", "int8")  # the keys of weights.table_format.ROW_DTYPES
CALIBRATIONS = ("none", "platt", "isotonic")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _typed(name: str, kind: str, value: object) -> object:
    """`value` as the field's annotated type (numpy ints become int, lists tuples); ValueError if it is not one."""
    if kind == "int" and _is_int(value):
        return int(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    item_kind = {"tuple[str, ...]": "str", "tuple[int, ...]": "int", "tuple[float, ...]": "float"}.get(kind)
    if item_kind and isinstance(value, (list, tuple)):
        return tuple(_typed(f"{name}[{i}]", item_kind, v) for i, v in enumerate(value))
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ValueError(f"{name} must be {'a finite float' if kind == 'float' else kind}, got "
                     f"{type(value).__name__} {shown}")


def _check_fields(config: object, ranges: dict[str, tuple]) -> None:
    """Coerce every field to its annotated type (ValueError naming the field), then check `ranges`:
    name -> ("min", lowest) | ("choice", allowed values)."""
    for f in fields(config):
        setattr(config, f.name, _typed(f.name, f.type, getattr(config, f.name)))
    for name, (rule, bound) in ranges.items():
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if rule == "min" and any(v < bound for v in values):
            raise ValueError(f"{name} must be >= {bound}, got {value!r}")
        if rule == "choice" and value not in bound:
            raise ValueError(f"{name} must be one of {bound}, got {value!r}")


@dataclass
class EncoderConfig:
    """Atomic Behavior Encoding (offline): how a behavior text becomes one table row."""
    num_lower_layers: int = 3
    max_tokens: int = 32            # a behavior text is truncated to this many tokens
    pooling: str = "auto"           # "mean" over the text's tokens, or "mean_after_first" (skip a decoder's
                                    # attention-sink first token); "auto": by family (engine.encoding.abe.default_pooling)
    table_dtype: str = "float32"    # storage dtype of the behavior/item tables
    token_budget: int = 8192        # tokens per encoding batch (texts are sorted by length first)

    def __post_init__(self) -> None:
        _check_fields(self, {"num_lower_layers": ("min", 0), "max_tokens": ("min", 1), "token_budget": ("min", 1),
                             "pooling": ("choice", ("auto", *POOLINGS)), "table_dtype": ("choice", TABLE_DTYPES)})


@dataclass
class ModelConfig:
    """Behavior Aggregation + CTR head (online, trainable)."""
    sequence_names: tuple[str, ...] = ("click", "buy", "search")
    max_behaviors: int = 1024       # M: at most the M most recent behaviors of each sequence are read (MovieLens: all)
    window_step: int = 0            # S: a longer history's window starts at a multiple of S (engine.features.history_window);
                                    # 0: max(1, M // 4), so a window holds between 3M/4 and M behaviors
    behavior_positions: str = "learned"  # "learned": a (M, d) embedding added at the gather; or "none"
    attention: str = "causal"       # upper layers: "causal" (every family; what timeline training needs)
                                    # or "family" (the family's own: BERT bidirectional, decoders causal)
    head_hidden: tuple[int, ...] = (256, 64)
    head_activation: str = "relu"
    similarity_features: bool = True  # the head also sees cosine(user sequence, item) per sequence
    head_text_dim: int = 64         # the text columns are projected to this width before the side ones (0: not)
    head_cross_layers: int = 2      # DCN-v2 cross layers before the MLP (0: MLP only)
    head_cross_rank: int = 64
    count_features: bool = True     # dense past-count features of user (its sequences) and item (stored stats)
    recent_events: int = 10         # with count_features: shares of each sequence among the user's last events
    item_id_dim: int = 16           # learned item-id embedding width, keyed by item-table row (0: none)
    item_id_dropout: float = 0.0    # training only: this share of targets read as unseen item ids (no id row, the
                                    # unseen item-id bucket), so items training never saw score from text and counts
    id_rows: bool = False           # the upper layers read each behavior's and item's frozen ABE row plus a learned
                                    # id row of the same width (zero at first; rows added after training: text only)
    similarity_temperatures: tuple[float, ...] = (0.02, 0.05, 0.1)  # soft counts of behaviors like the item
                                    # per sequence and temperature, from the ABE rows (engine.features.similarity; (): none)
    categorical_features: tuple[str, ...] = ()  # hashed categorical side features, e.g. ("user_id", "gender")
    categorical_buckets: int = 65536  # hash buckets shared by them (+1 row for values unseen in training)
    categorical_dim: int = 8        # embedding width per categorical feature (engine.features.categorical)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check_fields(self, {"max_behaviors": ("min", 1), "head_hidden": ("min", 1), "head_cross_layers": ("min", 0),
                             "head_cross_rank": ("min", 1), "head_text_dim": ("min", 0), "recent_events": ("min", 0),
                             "item_id_dim": ("min", 0), "dropout": ("min", 0.0), "categorical_buckets": ("min", 1),
                             "categorical_dim": ("min", 1),
                             "head_activation": ("choice", HEAD_ACTIVATIONS)})
        if not 0 <= self.window_step <= self.max_behaviors:
            raise ValueError(f"window_step must be in [0, max_behaviors={self.max_behaviors}], got {self.window_step}")
        if not self.dropout < 1:
            raise ValueError(f"dropout must be < 1, got {self.dropout}")
        if not 0 <= self.item_id_dropout < 1:
            raise ValueError(f"item_id_dropout must be in [0, 1), got {self.item_id_dropout}")
        if not all(t > 0 for t in self.similarity_temperatures):
            raise ValueError(f"similarity_temperatures must be > 0, got {self.similarity_temperatures}")
        if not all(self.categorical_features) or len(set(self.categorical_features)) != len(self.categorical_features):
            raise ValueError(f"categorical_features must be distinct non-empty names, got {self.categorical_features}")
        if not all(self.sequence_names):
            raise ValueError(f"sequence_names must be non-empty strings, got {self.sequence_names}")
        if not self.sequence_names or len(set(self.sequence_names)) != len(self.sequence_names):
            raise ValueError(f"sequence_names must be non-empty and unique, got {self.sequence_names}")
        if self.behavior_positions not in ("learned", "none"):
            raise ValueError(f"behavior_positions must be 'learned' or 'none', got {self.behavior_positions!r}")
        if self.attention not in ("causal", "family"):
            raise ValueError(f"attention must be 'causal' or 'family', got {self.attention!r}")

    @property
    def history_step(self) -> int:
        """The window step S in use (window_step, or its default for this max_behaviors)."""
        return self.window_step or max(1, self.max_behaviors // 4)

    def window_start(self, lengths: int | np.ndarray) -> int | np.ndarray:
        """First behavior read of histories of `lengths` behaviors (engine.features.history_window)."""
        return window_start(lengths, self.max_behaviors, self.history_step)

    def text_only(self) -> ModelConfig:
        """This model's text part alone (no side features, MLP head): what the raw-token baseline has."""
        return replace(self, count_features=False, recent_events=0, item_id_dim=0, id_rows=False, head_cross_layers=0,
                       similarity_features=False, head_text_dim=0, similarity_temperatures=(), categorical_features=())


@dataclass
class ScoringConfig:
    """What `BAHEScorer.score` / `rank` do with inputs they have not seen, and how they batch and cache."""
    unknown_sequence: str = "error"     # a sequence name not in sequence_names: "error" or "ignore"
    unknown_behavior: str = "encode"    # a behavior text not in the table: "encode" (on the fly) or "error"
    append_unknown: bool = False        # also append on-the-fly encoded texts to the table files
    unknown_item: str = "encode"        # an item text not in the item table: "encode" or "error"
    batch_size: int = 512               # users per forward pass
    dedupe_users: bool = True           # score: a user repeated in a batch runs the upper layers once
    user_cache_bytes: int = 0           # LRU of pooled user vectors, bounded by bytes (0: off)

    def __post_init__(self) -> None:
        _check_fields(self, {})
        for name, allowed in (("unknown_sequence", ("error", "ignore")), ("unknown_behavior", ("encode", "error")),
                              ("unknown_item", ("encode", "error"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.user_cache_bytes < 0:
            raise ValueError(f"user_cache_bytes must be >= 0, got {self.user_cache_bytes}")


@dataclass
class QueueConfig:
    """`BatchingScorer` (engine.deploy.request_queue): how concurrent `score` / `rank` calls are coalesced. A serving
    setting, not part of a saved scorer (never written to scorer.json)."""
    max_batch: int = 32                 # most requests (calls, not pairs) merged into one batched scorer call
    max_wait_ms: float = 2.0            # how long the first request of a batch waits for others to join it
    workers: int = 1                    # worker threads, each gathering and running its own batches (> 1: one
                                        # batch's host work overlaps another's compute)

    def __post_init__(self) -> None:
        _check_fields(self, {"max_batch": ("min", 1), "max_wait_ms": ("min", 0.0), "workers": ("min", 1)})


@dataclass
class CalibrationConfig:
    """The probability map applied after the head's sigmoid (engine.model.calibration): "none", or fitted on
    validation data by `bahe calibrate` - "platt": p' = sigmoid(a logit(p) + b), a > 0; "isotonic": piecewise
    linear through the non-decreasing points (x, y)."""
    kind: str = "none"
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check_fields(self, {"kind": ("choice", CALIBRATIONS)})
        if self.kind == "platt" and self.a <= 0:
            raise ValueError(f"a must be > 0 for platt calibration (an increasing map), got {self.a!r}")
        if self.kind == "isotonic":
            x, y = np.asarray(self.x), np.asarray(self.y)
            if x.size == 0 or x.size != y.size:
                raise ValueError(f"x and y must be non-empty and of one length, got {x.size} and {y.size}")
            if (np.diff(x) < 0).any() or (np.diff(y) < 0).any() or y.min() < 0 or y.max() > 1:
                raise ValueError("x and y must be non-decreasing and y within [0, 1] for isotonic calibration")


CONFIG_VERSION = 6  # the scorer.json format version this code writes
# Model keys introduced by a scorer.json format version, with the meaning a file of an older version had.
INTRODUCED_MODEL_KEYS = {
    3: {"attention": "family", "similarity_features": False, "head_text_dim": 0, "head_cross_layers": 0,
        "count_features": False, "recent_events": 0, "item_id_dim": 0},
    4: {"similarity_temperatures": (), "categorical_features": ()},
    5: {"window_step": 1},  # before 5 a long history was read as its last M behaviors
    6: {"id_rows": False},
}


@dataclass
class ScorerConfig:
    """Everything `save_pretrained` writes to scorer.json."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, format_version: int = CONFIG_VERSION) -> ScorerConfig:
        """The config of a scorer.json; keys missing from an older format take that format's meaning."""
        if not isinstance(raw, dict):
            raise ValueError(f"the scorer config must be a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"scorer config has unknown sections {sorted(map(str, unknown))}")
        parts = {}
        for part in fields(cls):
            kind = {"encoder": EncoderConfig, "model": ModelConfig, "scoring": ScoringConfig,
                    "calibration": CalibrationConfig}[part.name]
            given = raw.get(part.name, {})
            if not isinstance(given, dict):
                raise ValueError(f"scorer config section {part.name!r} must be a mapping, got {type(given).__name__}")
            if part.name == "model":
                for version, meaning in INTRODUCED_MODEL_KEYS.items():
                    if format_version < version:
                        given = {**meaning, **given}
            unknown = set(given) - {f.name for f in fields(kind)}
            if unknown:
                raise ValueError(f"scorer config section {part.name!r} has unknown keys {sorted(map(str, unknown))}")
            try:
                parts[part.name] = kind(**given)
            except ValueError as err:
                raise ValueError(f"{part.name}.{err}") from None
        return cls(**parts)
