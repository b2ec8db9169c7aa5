"""`bahe update --stream WORK`: engine.training.loops.update over a new log bigger than memory, laid out as user shards
(engine.training.streaming.stream) and fine-tuned shard by shard (engine.training.streaming.stream_train): memory holds the
model and one shard, not the log.

The stream's global time split is the update's: its train part fine-tunes, its val part early-stops, its test part
(the newest `gate_fraction` of the events) is the gate, scored shard by shard by CURRENT and NEXT. Users'
histories are the new log's own (no history log, so nothing to replay). The served item counts are
CURRENT's plus every event of the new log, summed over the shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.serving.scorer import BAHEScorer
from engine.deploy.versions import ScorerVersions
from engine.training.streaming.stream import StreamConfig, prepare_stream
from engine.training.loops.ctr_models import BAHECTR
from engine.training.streaming.stream_train import StreamBudget, catalog_log, fit_stream, use_shard
from engine.training.loops.train import predict
from engine.training.loops.update import (UpdateConfig, UpdateResult, check_fractions, check_log, extend_item_counts,
                                          judge_and_publish, next_record, next_tables, next_vocabulary, scorer_pair,
                                          update_work)


def update_streamed(root: str | Path, log_path: str | Path, work: str | Path, config: UpdateConfig | None = None, *,
                    shards: int = 16, budget: StreamBudget = StreamBudget(), device: str = "auto",
                    catalog: str | Path | None = None, timestamps: str = "auto") -> UpdateResult:
    """`update_scorer` for the log file `log_path` (read with the item `catalog` file and `timestamps` format, as
    `load_log`), streamed through the folder `work` (see the module docstring)."""
    config = config or UpdateConfig()
    check_fractions(config)
    versions = ScorerVersions(root, config.keep)
    version = versions.current()
    current = BAHEScorer.from_pretrained(version.path, device=device)
    stream = prepare_stream(log_path, work, StreamConfig(
        shards=shards, time_buckets=shards, train=1 - config.gate_fraction - config.val_fraction,
        val=config.val_fraction), catalog=catalog, timestamps=timestamps)
    stream_catalog = catalog_log(stream)
    check_log(current, stream_catalog)
    ids = next_vocabulary(current, stream.user_ids(), stream_catalog, stream.item_features)
    with update_work(versions.root) as tables:
        behaviors, items, appended = next_tables(current, stream_catalog, tables)
        baseline, upcoming = scorer_pair(current, behaviors, items, ids)  # (config.train.norm_batches unused)
        trained, before = BAHECTR(upcoming, stream_catalog), BAHECTR(baseline, stream_catalog)
        result = fit_stream(trained, stream, config.train, budget=budget, device=str(upcoming.device))
        ids = stream.item_ids
        counts = np.zeros((ids.size, len(stream.sequence_names)), dtype=np.int64)
        labels, users, probs = [], [], {"current": [], "next": []}
        sizes = {"train": 0, "val": 0, "gate": 0, "replay": 0}
        for shard in stream:  # the gate period shard by shard; the new log's item counts over all shards
            np.add.at(counts, np.searchsorted(ids, shard.log.item), shard.log.membership.astype(np.int64))
            for name, part in (("train", shard.split.train), ("val", shard.split.val), ("gate", shard.split.test)):
                sizes[name] += int(part.size)
            rows = shard.split.test
            if not rows.size:
                continue
            for name, model in (("current", before), ("next", trained)):
                use_shard(model, shard)
                probs[name].append(predict(model, shard.log, rows, batch_size=config.train.eval_batch_size,
                                           device=str(upcoming.device)))
            labels.append(shard.log.label[rows])
            users.append(shard.log.user[rows])
        if not sizes["gate"]:
            raise ValueError("the new log's gate period holds no examples; give a longer log or a larger gate_fraction")
        gate, published = judge_and_publish(
            versions, version, np.concatenate(labels), np.concatenate(users),
            {name: np.concatenate(p) for name, p in probs.items()}, upcoming,
            lambda: extend_item_counts(trained, ids, counts, stream.sequence_names), config,
            {"appended": appended, "rows": sizes, "stream": {"shards": stream.shards, "events": stream.events}},
            next_record(version.path, stream.test_start, stream.user_ids(), str(log_path),
                        sizes["train"] + sizes["val"]))
    return UpdateResult(version.name, published, gate, result, appended, sizes, stream.test_start)
