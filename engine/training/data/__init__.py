"""Behavior logs: the generic format (`log_schema` checks a table, `log` holds the events and their
histories, `log_files` reads and writes files) and MovieLens-100K (`movielens`)."""
from engine.training.data.log import BehaviorLog, Ragged, TimeSplit
from engine.training.data.log_files import load_log, write_log
from engine.training.data.log_schema import LogFormatError
from engine.training.data.movielens import load_movielens, write_movielens

__all__ = ["BehaviorLog", "LogFormatError", "Ragged", "TimeSplit", "load_log", "write_log", "load_movielens",
           "write_movielens"]
