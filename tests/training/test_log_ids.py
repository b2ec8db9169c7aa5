"""String and integer ids in logs (engine.training.data.log_columns, weights.id_vocabulary): exact keys, the
"17" vs 17 rule, the append-only vocabulary a scorer folder keeps, and the hashed buckets' collision report."""
import json

import numpy as np
import pandas as pd
import pytest

from engine import cli
from engine.features.categorical import bucket_collisions, bucket_of
from engine.serving.scorer import BAHEScorer
from engine.training.data.log import BehaviorLog
from engine.training.data.log_files import load_log, write_log
from engine.training.data.log_schema import LogFormatError
from weights.id_vocabulary import FILE_NAME, IdError, IdVocabulary, VocabularyFile, id_key
from tests.synthetic_logs import FIXTURE


def _string_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """The same log keyed as real logs are: user UUID-like strings, item SKUs with leading zeros."""
    return frame.assign(user_id=[f"user-{u:04x}-{u * 7919 % 65536:04x}" for u in frame["user_id"]],
                        item_id=[f"SKU-{i:06d}" for i in frame["item_id"]])


def test_a_log_keyed_by_strings_is_the_same_log_as_by_integers(tmp_path):
    frame = pd.read_parquet(FIXTURE)
    _string_ids(frame).to_csv(tmp_path / "log.csv", index=False)
    by_int, by_str = load_log(FIXTURE), load_log(tmp_path / "log.csv")
    assert by_int.user_keys is None and by_str.user_keys is not None and by_str.item_keys is not None
    assert by_str.num_events == by_int.num_events and by_str.examples.size == by_int.examples.size
    order = np.lexsort((by_str.timestamp, by_str.user_key(by_str.user)))  # both logs in (user, time) order...
    rows_int = np.lexsort((by_int.timestamp, [f"user-{u:04x}-{u * 7919 % 65536:04x}" for u in by_int.user]))
    assert by_str.sequence_texts(order, 8) == by_int.sequence_texts(rows_int, 8)  # ...have the same histories
    assert by_str.target_texts(order) == by_int.target_texts(rows_int)
    assert by_str.item_key(by_str.item[order]) == [f"SKU-{i:06d}" for i in by_int.item[rows_int]]
    users = by_str.category_values("user_id", order)
    assert users[0].startswith("user-") and len(set(users)) == np.unique(by_int.user).size
    write_log(by_str, tmp_path / "again.parquet")  # keys written back, read back the same
    again = load_log(tmp_path / "again.parquet")
    assert sorted(again.user_key(again.user)) == sorted(by_str.user_key(by_str.user))


def test_17_and_its_text_are_one_id_and_017_another(tmp_path):
    """The rule: an integer and its decimal text are the same id; any other text (017, +17, 17.0, ' 17') is
    another id. Across files (parquet integers, CSV text) and inside one column."""
    rows = {"timestamp": [1, 2, 3, 4], "label": [1, 0, 1, 0], "item_text": ["a", "a", "b", "c"]}
    mixed = pd.DataFrame({"user_id": [17, "17", "017", " 17"], "item_id": [5, 5, "05", 6], **rows})
    log = BehaviorLog.from_frame(mixed, min_history=0)
    assert sorted(log.user_key(np.unique(log.user))) == [" 17", "017", "17"]
    assert sorted(log.item_key(log.item_ids)) == ["05", "5", "6"]
    pd.DataFrame({"user_id": [17, 17], "item_id": [5, 6], **{k: v[:2] for k, v in rows.items()}}).to_parquet(
        tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("user_id,item_id,timestamp,label,item_text\n17,5,1,1,a\n17,6,2,0,a\n")
    a, b = load_log(tmp_path / "a.parquet"), load_log(tmp_path / "b.csv")
    assert a.user_key(a.user) == b.user_key(b.user) == ["17", "17"]
    assert id_key(17) == id_key("17") == id_key(np.int64(17)) == id_key(17.0) == "17" != id_key("017")
    assert bucket_of("user_id", 17, 1 << 16) == bucket_of("user_id", "17", 1 << 16)  # hashed buckets: same rule


@pytest.mark.parametrize("value,why", [(None, "string or an integer"), (True, "got True"), ("", "empty"),
                                       ("  ", "blank"), (1.5, "float 1.5"), (float("nan"), "missing"),
                                       (2.0 ** 60, "float"), ([1], "got list")])
def test_what_is_not_an_id(value, why):
    with pytest.raises(IdError, match=why):
        id_key(value)


def test_the_vocabulary_is_append_only_and_refuses_a_changed_text(tmp_path):
    path = tmp_path / FILE_NAME
    first = VocabularyFile.update(path, ["u1", "u2"], {"SKU-1": "Heat", "17": "Up"})
    assert first.users.keys == ["u1", "u2"] and first.items.numbers(["17", "SKU-1", "x"]).tolist() == [1, 0, -1]
    second = VocabularyFile.update(path, ["u3", "u1"], {"SKU-9": "Big", "17": "Up"})
    again = VocabularyFile.read(path)
    assert again.users.keys == ["u1", "u2", "u3"] and again.items.keys == ["SKU-1", "17", "SKU-9"]
    assert again.text_of("SKU-9") == "Big" == second.text_of("SKU-9") and again.text_of("nope") is None
    before = path.read_bytes()
    with pytest.raises(IdError, match=r"item '17' has the text 'Up' in the vocabulary and 'Down' now"):
        VocabularyFile.update(path, [], {"SKU-5": "New", "17": "Down"})
    assert path.read_bytes() == before  # nothing written
    vocabulary = IdVocabulary(["a"])
    assert vocabulary.extend(["b", "a", "c", "b"]).tolist() == [1, 0, 2, 1] and len(vocabulary) == 3


@pytest.mark.parametrize("body,why", [(b"{", "not an id vocabulary"), (b"[]", "format is not"),
                                      (b'{"format": "bahe-ids", "format_version": 9}', "format_version 9"),
                                      (b'{"format": "bahe-ids", "format_version": 1, "users": [1], "items": [], '
                                       b'"item_texts": []}', "lists of strings"),
                                      (b'{"format": "bahe-ids", "format_version": 1, "users": ["a", "a"], '
                                       b'"items": [], "item_texts": []}', "listed twice")])
def test_a_damaged_vocabulary_file_is_an_id_error(tmp_path, body, why):
    (tmp_path / FILE_NAME).write_bytes(body)
    with pytest.raises(IdError, match=why):
        VocabularyFile.read(tmp_path / FILE_NAME)


def test_bucket_collisions_count_values_sharing_a_bucket():
    values = [f"u{i}" for i in range(50)] + [None, "u1", "u2"]
    report = bucket_collisions("user_id", values, 8)
    used = {bucket_of("user_id", f"u{i}", 8) for i in range(50)}
    assert report == {"values": 50, "buckets": len(used), "collision_rate": round(1 - len(used) / 50, 6)}
    assert report["collision_rate"] >= 1 - 8 / 50
    assert bucket_collisions("user_id", [None], 8)["collision_rate"] == 0.0


def test_train_on_string_ids_saves_the_vocabulary_and_reports_collisions(tiny_checkpoints, tmp_path, capsys):
    log = tmp_path / "log.csv"
    _string_ids(pd.read_parquet(FIXTURE)).to_csv(log, index=False)
    out = tmp_path / "run"
    args = ["train", "--data", str(log), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
            "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--train-examples", "60",
            "--val-examples", "20", "--test-examples", "30", "--device", "cpu"]
    cli.main(args)
    printed = capsys.readouterr().out
    report = next(json.loads(x) for x in printed.splitlines() if x.startswith('{"hashed_buckets"'))["hashed_buckets"]
    assert report["user_id"]["values"] == 8 and set(report) == {"user_id", "gender", "occupation", "age"}
    vocabulary = VocabularyFile.read(out / "scorer" / FILE_NAME)
    frame = _string_ids(pd.read_parquet(FIXTURE))
    assert set(vocabulary.users.keys) == set(frame["user_id"]) and set(vocabulary.items.keys) == set(frame["item_id"])
    first = frame.iloc[0]
    assert vocabulary.text_of(first["item_id"]) == first["item_text"]
    scorer = BAHEScorer.from_pretrained(out / "scorer", device="cpu")  # string user ids hashed as served
    buckets = scorer.config.model.categorical_buckets
    seen = scorer.model.side.category_seen
    assert sum(bool(seen[bucket_of("user_id", u, buckets)]) for u in set(frame["user_id"])) >= 4  # trained users
    assert not any(bool(seen[bucket_of("user_id", code, buckets)]) for code in range(8))  # not their codes
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"user": {}, "item_id": first["item_id"],
                                    "side_features": {"user_id": first["user_id"]}}) + "\n")
    cli.main(["score", "--scorer", str(out / "scorer"), "--input", str(requests), "--device", "cpu"])
    scored = json.loads(capsys.readouterr().out)
    assert scored["item_id"] == first["item_id"] and scored["item"] == first["item_text"] and 0 < scored["p_click"] < 1
    frame.loc[frame["item_id"] == first["item_id"], "item_text"] = "Another text"
    frame.to_csv(log, index=False)
    with pytest.raises(SystemExit, match=rf"bahe train: .*item '{first['item_id']}' has the text"):
        cli.main(args)  # stopped before training: the saved scorer and its vocabulary stay as they were
    assert VocabularyFile.read(out / "scorer" / FILE_NAME).text_of(first["item_id"]) == first["item_text"]


def test_a_streamed_log_with_string_ids_gives_the_in_memory_log(tmp_path):
    """prepare_stream numbers string ids through one vocabulary over all record batches: in file order of first
    appearance, as load_log does, so every shard row matches the in-memory log's."""
    from engine.training.streaming.stream import StreamConfig, prepare_stream
    path = tmp_path / "log.parquet"
    _string_ids(pd.read_parquet(FIXTURE)).to_parquet(path)
    memory = load_log(path)
    stream = prepare_stream(path, tmp_path / "work", StreamConfig(shards=3, time_buckets=4, batch_rows=97))
    assert stream.user_keys.tolist() == memory.user_keys.tolist()
    assert stream.item_keys.tolist() == memory.item_keys.tolist() and stream.item_texts == memory.item_texts
    frame = pd.read_parquet(path)
    code_of = {key: code for code, key in enumerate(memory.user_keys.tolist())}
    order = np.lexsort((frame["timestamp"].to_numpy(), [code_of[k] for k in frame["user_id"]]))
    row_of = np.empty_like(order)
    row_of[order] = np.arange(order.size)
    seen = []
    for shard in stream:
        rows, log = row_of[shard.events], shard.log
        seen.append(rows)
        assert log.user_key(log.user) == memory.user_key(memory.user[rows])
        assert log.item_key(log.item) == memory.item_key(memory.item[rows])
        assert log.category_values("user_id", np.arange(rows.size)) == memory.category_values("user_id", rows)
        local = log.examples
        assert log.sequence_texts(local, 8) == memory.sequence_texts(rows[local], 8)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(memory.num_events))


def test_a_stream_whose_string_ids_start_late_is_refused(tmp_path):
    from engine.training.streaming.stream import StreamConfig, prepare_stream
    frame = pd.read_parquet(FIXTURE)
    frame["user_id"] = [str(u) if i != 200 else "late" for i, u in enumerate(frame["user_id"])]  # "2" is the id 2
    frame.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(LogFormatError, match=r"rows 0 to 193 hold integer ids only, the rows from row 194 on hold "
                                             r"other ids"):
        prepare_stream(tmp_path / "log.parquet", tmp_path / "work", StreamConfig(shards=2, batch_rows=97))
    frame.to_csv(tmp_path / "log.csv", index=False)  # a CSV file: its lines, header = line 1
    with pytest.raises(LogFormatError, match=r"log.csv: lines 2 to 195 hold integer ids only, the lines from line "
                                             r"196 on hold other ids"):
        prepare_stream(tmp_path / "log.csv", tmp_path / "work", StreamConfig(shards=2, batch_rows=97))


def test_bahe_train_stream_on_string_ids_saves_their_vocabulary(tiny_checkpoints, tmp_path, capsys):
    log = tmp_path / "log.csv"
    frame = _string_ids(pd.read_parquet(FIXTURE))
    frame.to_csv(log, index=False)
    out = tmp_path / "run"
    cli.main(["train", "--data", str(log), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--device", "cpu", "--stream",
              str(tmp_path / "work"), "--shards", "2", "--steps-per-shard", "2", "--eval-per-shard", "20"])
    assert "test AUC" in capsys.readouterr().out
    vocabulary = VocabularyFile.read(out / "scorer" / FILE_NAME)
    assert set(vocabulary.users.keys) == set(frame["user_id"]) and set(vocabulary.items.keys) == set(frame["item_id"])


def test_item_features_are_stored_once_and_never_changed(tmp_path):
    path = tmp_path / FILE_NAME
    VocabularyFile.update(path, [], {"a": "A", "b": "B"}, item_features={"genre": {"a": "Action"}})
    VocabularyFile.update(path, [], {"b": "B", "c": "C"}, item_features={"genre": {"a": "Drama", "b": "Comedy"},
                                                                       "era": {"c": "90s"}})
    stored = VocabularyFile.read(path)
    assert stored.item_features == {"genre": ["Action", "Comedy", None], "era": [None, None, "90s"]}
    assert stored.features_of("a") == {"genre": "Action"} and stored.features_of("zz") == {}
    raw = json.loads(path.read_text())
    raw["item_features"]["genre"] = ["x"]
    path.write_text(json.dumps(raw))
    with pytest.raises(IdError, match="one string or null per item"):
        VocabularyFile.read(path)


def test_catalog_features_are_item_level_and_user_features_are_not(tmp_path):
    from engine.training.data.item_features import item_level_features
    (tmp_path / "items.csv").write_text("item_id,item_text,cat_genre\nSKU-1,Heat,Action\nSKU-2,Up,Family\n17,Big,"
                                        "Comedy\n")
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp,label,cat_gender\nu0,SKU-1,100,1,M\nu0,17,200,0,M\n"
                                      "u1,SKU-2,150,1,F\nu1,17,160,0,F\n")
    log = load_log(tmp_path / "log.csv", catalog=tmp_path / "items.csv")
    assert item_level_features(log) == {"genre": {"SKU-1": "Action", "17": "Comedy", "SKU-2": "Family"}}
