"""BAHE engine: offline Atomic Behavior Encoding, online Behavior Aggregation, CTR scoring."""
from engine.abe import AtomicEncoder
from engine.config import EncoderConfig, ModelConfig, ScorerConfig, ScoringConfig
from engine.scorer import BAHEScorer, InputError, ScorerFormatError

__all__ = ["AtomicEncoder", "BAHEScorer", "EncoderConfig", "InputError", "ModelConfig", "ScorerConfig",
           "ScorerFormatError", "ScoringConfig"]
