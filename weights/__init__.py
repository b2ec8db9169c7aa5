"""Everything on disk: checkpoints (split into frozen lower / trainable upper) and behavior tables."""
from weights.checkpoint import Checkpoint, CheckpointError
from weights.split import LowerEncoder, UpperEncoder, split_checkpoint
from weights.table import (BehaviorTable, HashCollisionError, ModelSignature, NonFiniteRowError, TableError,
                           TableFormatError, TableMismatchError, UnknownTextError)

__all__ = ["BehaviorTable", "Checkpoint", "CheckpointError", "HashCollisionError", "LowerEncoder", "ModelSignature",
           "NonFiniteRowError", "TableError", "TableFormatError", "TableMismatchError", "UnknownTextError",
           "UpperEncoder", "split_checkpoint"]
