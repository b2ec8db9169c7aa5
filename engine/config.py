"""Configuration, one dataclass per concern, with defaults that work out of the box."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass
class EncoderConfig:
    """Atomic Behavior Encoding (offline): how a behavior text becomes one table row."""
    num_lower_layers: int = 3
    max_tokens: int = 32            # a behavior text is truncated to this many tokens
    pooling: str = "auto"           # "mean" over the text's tokens, or "mean_after_first" (skip a decoder's
                                    # attention-sink first token); "auto": by family (engine.abe.default_pooling)
    table_dtype: str = "float32"    # storage dtype of the behavior/item tables
    token_budget: int = 8192        # tokens per encoding batch (texts are sorted by length first)


@dataclass
class ModelConfig:
    """Behavior Aggregation + CTR head (online, trainable)."""
    sequence_names: tuple[str, ...] = ("click", "buy", "search")
    max_behaviors: int = 1024       # M: the most recent M behaviors of each sequence are kept (MovieLens: all)
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
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.sequence_names = tuple(self.sequence_names)
        self.head_hidden = tuple(self.head_hidden)
        if not self.sequence_names or len(set(self.sequence_names)) != len(self.sequence_names):
            raise ValueError(f"sequence_names must be non-empty and unique, got {self.sequence_names}")
        if self.max_behaviors < 1:
            raise ValueError(f"max_behaviors must be >= 1, got {self.max_behaviors}")
        if self.behavior_positions not in ("learned", "none"):
            raise ValueError(f"behavior_positions must be 'learned' or 'none', got {self.behavior_positions!r}")
        if self.attention not in ("causal", "family"):
            raise ValueError(f"attention must be 'causal' or 'family', got {self.attention!r}")
        if min(self.head_cross_layers, self.item_id_dim, self.recent_events, self.head_text_dim) < 0 or self.head_cross_rank < 1:
            raise ValueError(f"head_cross_layers, item_id_dim and recent_events must be >= 0 and head_cross_rank >= 1, "
                             f"got {self.head_cross_layers}, {self.item_id_dim}, {self.recent_events}, "
                             f"{self.head_cross_rank}")


    def text_only(self) -> ModelConfig:
        """This model's text part alone (no side features, MLP head): what the raw-token baseline has."""
        return replace(self, count_features=False, recent_events=0, item_id_dim=0, head_cross_layers=0,
                       similarity_features=False, head_text_dim=0)


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
        for name, allowed in (("unknown_sequence", ("error", "ignore")), ("unknown_behavior", ("encode", "error")),
                              ("unknown_item", ("encode", "error"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.user_cache_bytes < 0:
            raise ValueError(f"user_cache_bytes must be >= 0, got {self.user_cache_bytes}")


CONFIG_VERSION = 3  # scorer.json format version that introduced the keys of LEGACY_MODEL
LEGACY_MODEL = {"attention": "family", "similarity_features": False, "head_text_dim": 0, "head_cross_layers": 0, "count_features": False, "recent_events": 0,
                "item_id_dim": 0}


@dataclass
class ScorerConfig:
    """Everything `save_pretrained` writes to scorer.json."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, format_version: int = CONFIG_VERSION) -> ScorerConfig:
        """The config of a scorer.json; keys missing from an older format take that format's meaning."""
        parts = {}
        for part in fields(cls):
            kind = {"encoder": EncoderConfig, "model": ModelConfig, "scoring": ScoringConfig}[part.name]
            given = raw.get(part.name, {})
            if part.name == "model" and format_version < CONFIG_VERSION:
                given = {**LEGACY_MODEL, **given}
            unknown = set(given) - {f.name for f in fields(kind)}
            if unknown:
                raise ValueError(f"scorer config section {part.name!r} has unknown keys {sorted(unknown)}")
            parts[part.name] = kind(**given)
        return cls(**parts)
