"""BAHE engine: offline Atomic Behavior Encoding, online Behavior Aggregation, CTR scoring.
Names are imported on first use, so the `bahe` command line starts without loading every model."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AtomicEncoder": "engine.encoding.abe",
    **{name: "engine.config" for name in ("EncoderConfig", "ModelConfig", "QueueConfig", "ScorerConfig",
                                         "ScoringConfig")},
    "BatchingScorer": "engine.deploy.request_queue", "QueueClosedError": "engine.deploy.request_queue",
    "BAHEScorer": "engine.serving.scorer", "Ranking": "engine.serving.ranking", "InputError": "engine.serving.inputs", "ScorerFormatError": "engine.serving.scorer_folder",
    "ScorerHandle": "engine.deploy.handle", "VersionedState": "engine.deploy.handle",
    "ScorerVersions": "engine.deploy.versions", "VersionError": "engine.deploy.versions",
    "FeatureProvider": "engine.export.online",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
