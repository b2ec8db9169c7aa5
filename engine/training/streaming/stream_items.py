"""The item side of a streamed log (engine.training.streaming.stream): each event's item counts, over ALL users'
events strictly before it, computed over time buckets with a carried per-item total, and sent back to the
event's user shard by event id.

Bucket b holds the events with timestamp keys in [edge_b, edge_{b+1}) (whole timestamps: edges fall on
histogram bin boundaries). For an event of bucket b, the events of its item strictly before it are those of
buckets < b (the carried total when b starts) plus those of bucket b strictly before it (`counts_before`
inside the bucket): the in-memory `past_counts` item half, exactly.
"""
from __future__ import annotations

import numpy as np

from engine.training.data.example_features import counts_before
from engine.training.streaming.membership_bits import unpack_membership
from engine.training.streaming.stream_time import balanced_edges, to_key

__all__ = ["item_count_pass"]


def item_count_pass(stream, first: tuple[np.ndarray, int], lo: int, config) -> dict[int, np.ndarray]:
    """Write items-{p}.parquet (event, s0..s{S-1}: item counts) for every user shard p of `stream`; returns
    {cut: (I, S) int64 counts of each catalog item's events with timestamp < cut} for the split's two cuts
    (the snapshot a trained scorer serves with: BAHECTR.store_item_counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, shards, sequences = stream.folder, stream.shards, len(stream.sequence_names)
    edges = balanced_edges(*first, lo, config.time_buckets)
    columns = ["event", "item_id", "timestamp", "membership"]
    writers: list = [None] * config.time_buckets
    try:  # pass 3: user shards -> time buckets, each row tagged with its user shard
        for p in range(shards):
            for batch in pq.ParquetFile(folder / f"users-{p}.parquet").iter_batches(config.batch_rows, columns=columns):
                table = pa.Table.from_batches([batch]).append_column("shard", pa.array(np.full(batch.num_rows, p, np.int32)))
                bucket = np.searchsorted(edges, to_key(table["timestamp"].to_numpy()), side="right")
                for b in np.unique(bucket).tolist():
                    part = table.filter(pa.array(bucket == b))
                    if writers[b] is None:
                        writers[b] = pq.ParquetWriter(folder / f"bucket-{b}.parquet", part.schema)
                    writers[b].write_table(part)
    finally:
        for w in writers:
            if w is not None:
                w.close()
    item_ids = stream.item_ids
    carry = np.zeros((item_ids.size, sequences), dtype=np.int64)
    cuts = sorted({stream.val_start, stream.test_start})
    before = {cut: np.zeros_like(carry) for cut in cuts}
    out: list = [None] * shards
    schema = pa.schema([("event", pa.int64()), *[(f"s{s}", pa.int64()) for s in range(sequences)]])
    try:  # pass 4: bucket by bucket, in time order
        for b in range(config.time_buckets):
            if writers[b] is None:
                continue
            table = pq.read_table(folder / f"bucket-{b}.parquet")
            item = np.searchsorted(item_ids, table["item_id"].to_numpy())
            timestamp = table["timestamp"].to_numpy()
            member = unpack_membership(table["membership"].to_numpy(), sequences).astype(np.int64)
            counts = counts_before(item, timestamp, member, item, timestamp) + carry[item]
            np.add.at(carry, item, member)
            for cut in cuts:
                keep = timestamp < cut
                np.add.at(before[cut], item[keep], member[keep])
            shard, event = table["shard"].to_numpy(), table["event"].to_numpy()
            for p in np.unique(shard).tolist():
                rows = shard == p
                part = pa.table({"event": event[rows], **{f"s{s}": counts[rows, s] for s in range(sequences)}},
                                schema=schema)
                if out[p] is None:
                    out[p] = pq.ParquetWriter(folder / f"items-{p}.parquet", schema)
                out[p].write_table(part)
            del table, item, timestamp, member, counts
            (folder / f"bucket-{b}.parquet").unlink()
    finally:
        for w in out:
            if w is not None:
                w.close()
    for p in range(shards):
        if out[p] is None:
            pq.write_table(schema.empty_table(), folder / f"items-{p}.parquet")
    return before
