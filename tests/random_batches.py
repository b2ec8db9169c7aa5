"""Random valid PackedBatches for the full CTR model (ragged sequences, one of them empty, count features)."""
import numpy as np
import torch

from engine.model.bahe_model import PackedBatch


def random_packed_batch(rng: np.random.Generator, users: int, num_sequences: int, max_behaviors: int,
                        behavior_rows: int, item_rows: int) -> PackedBatch:
    """`users` users with `num_sequences` sequences of 0..max_behaviors rows of a `behavior_rows`-row
    table (the first one empty), items drawn from `item_rows` rows, random count features (5 per sequence:
    4 counts + the recent share), validated on the host as the API boundary does."""
    lengths = rng.integers(0, max_behaviors + 1, size=users * num_sequences)
    lengths[0] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    dense = torch.from_numpy(rng.random((users, 5 * num_sequences), dtype=np.float32))
    batch = PackedBatch(torch.from_numpy(rng.integers(0, behavior_rows, size=int(offsets[-1]))),
                        torch.from_numpy(offsets), torch.from_numpy(rng.integers(0, item_rows, size=users)),
                        dense=dense)
    batch.validate(num_sequences, behavior_rows, item_rows)
    return batch
