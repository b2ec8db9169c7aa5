"""Behavior logs: the generic file format (`log`) and MovieLens-100K (`movielens`)."""
from engine.training.data.log import BehaviorLog, ExampleBatch, LogFormatError, Ragged, TimeSplit, load_log, write_log
from engine.training.data.movielens import load_movielens, write_movielens

__all__ = [
    "BehaviorLog",
    "ExampleBatch",
    "LogFormatError",
    "Ragged",
    "TimeSplit",
    "load_log",
    "write_log",
    "load_movielens",
    "write_movielens",
]
