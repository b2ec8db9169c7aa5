"""Item catalog files (engine.training.data.log_files.join_catalog) and timestamps as integers or ISO-8601 times
(engine.training.data.log_columns): what is accepted, and the line and column of each refusal."""
import csv
import io

import numpy as np
import pandas as pd
import pytest

from engine.training.data.log_files import load_log
from engine.training.data.log_schema import LogFormatError
from tests.synthetic_logs import FIXTURE

CATALOG = 'item_id,item_text,cat_genre\nSKU-1,Heat,Action\nSKU-2,"Up, the film",Family\n17,Big,Comedy\n'
EVENTS = "user_id,item_id,timestamp,label\nu0,SKU-1,100,1\nu0,17,200,0\nu1,SKU-2,150,1\nu1,17,160,0\n"


def _files(tmp_path, events=EVENTS, catalog=CATALOG):
    (tmp_path / "log.csv").write_text(events)
    (tmp_path / "items.csv").write_text(catalog)
    return tmp_path / "log.csv", tmp_path / "items.csv"


def test_a_catalog_gives_the_events_their_texts_and_item_features(tmp_path):
    log = load_log(_files(tmp_path)[0], min_history=0, catalog=tmp_path / "items.csv")
    assert log.target_texts(np.arange(4)) == ["Heat", "Big", "Up, the film", "Big"]
    assert log.category_values("genre", np.arange(4)) == ["Action", "Comedy", "Family", "Comedy"]
    assert sorted(log.item_key(log.item_ids)) == ["17", "SKU-1", "SKU-2"]


def test_the_fixture_with_its_texts_in_a_catalog_is_the_same_log(tmp_path):
    frame = pd.read_parquet(FIXTURE)
    frame.drop(columns="item_text").to_parquet(tmp_path / "events.parquet")
    frame[["item_id", "item_text"]].drop_duplicates().to_csv(tmp_path / "items.csv", index=False)
    whole, split = load_log(FIXTURE), load_log(tmp_path / "events.parquet", catalog=tmp_path / "items.csv")
    rows = whole.examples
    assert split.sequence_texts(rows, 8) == whole.sequence_texts(rows, 8)
    assert split.target_texts(rows) == whole.target_texts(rows) and (split.item == whole.item).all()


@pytest.mark.parametrize("events,catalog,where,want", [
    (EVENTS, CATALOG.replace("17,Big", "SKU-1,Big"), "items.csv", r"line 4, column 'item_id': item 'SKU-1' is listed "
                                                                 r"twice \(first at line 2\)"),
    (EVENTS, CATALOG.replace("17,Big", "17, "), "items.csv", r"line 4, column 'item_text': empty \(item_id 17\)"),
    (EVENTS, "item_id,text\n1,a\n", "items.csv", r"missing column\(s\) \['item_text'\]"),
    (EVENTS.replace("u1,SKU-2", "u1,SKU-3"), CATALOG, "log.csv", r"line 4, column 'item_id': item 'SKU-3' is not in "
                                                                 r"the catalog"),
    (EVENTS.replace("label\n", "label,item_text\n").replace(",1\n", ",1,Heat\n").replace(",0\n", ",0,Small\n"),
     CATALOG, "log.csv", r"line 3, column 'item_text': 'Small' differs from the catalog's text 'Big' for item '17'"),
    ("user_id,item_id,timestamp,label,cat_genre\nu0,SKU-1,100,1,x\n", CATALOG, "log.csv",
     r"column\(s\) \['cat_genre'\] are in the catalog .*items.csv too"),
])
def test_catalog_refusals_name_the_file_line_and_column(tmp_path, events, catalog, where, want):
    log, items = _files(tmp_path, events, catalog)
    with pytest.raises(LogFormatError, match=rf"{where}: .*{want}"):
        load_log(log, catalog=items)


def test_iso_timestamps_are_epoch_milliseconds_utc(tmp_path):
    events = ("user_id,item_id,timestamp,label\nu0,SKU-1,2024-05-01T12:00:00Z,1\nu0,17,2024-05-01,0\n"
              "u1,SKU-2,2024-05-01 13:00:00.250+02:00,1\nu1,17,2024-05-01T11:00:00.250,0\n")
    log = load_log(_files(tmp_path, events)[0], min_history=0, catalog=tmp_path / "items.csv")
    want = {1714564800000, 1714521600000, 1714561200250}
    assert set(log.timestamp.tolist()) == want and log.timestamp.dtype == np.int64
    assert log.timestamp.tolist().count(1714561200250) == 2  # 13:00:00.250+02:00 and 11:00:00.250 (naive: UTC)
    frame = pd.DataFrame({"user_id": [1, 1], "item_id": [2, 3], "label": [1, 0], "item_text": ["a", "b"],
                          "timestamp": pd.to_datetime(["2024-05-01T12:00:00Z", "2024-05-01"], utc=True,
                                                           format="ISO8601")})
    frame.to_parquet(tmp_path / "t.parquet")
    assert load_log(tmp_path / "t.parquet", min_history=0).timestamp.tolist() == [1714521600000, 1714564800000]


@pytest.mark.parametrize("cells,timestamps,want", [
    (["2024-05-01", "2024-13-01"], "auto", r"line 3, column 'timestamp': '2024-13-01' is not an ISO-8601 time"),
    (["2024-05-01", "soon"], "iso8601", r"line 3, column 'timestamp': 'soon' is not an ISO-8601 time"),
    (["2024-05-01", "100"], "auto", r"line 3, column 'timestamp': '100' is not an ISO-8601 time"),
    (["100", "2024-05-01"], "auto", r"line 3, column 'timestamp': must hold integers, got '2024-05-01'"),
    (["soon", "2024-05-01"], "auto", r"line 2, column 'timestamp': must hold integers, got 'soon'"),
    (["100", "200"], "iso8601", r"line 2, column 'timestamp': '100' is not an ISO-8601 time"),
    (["100", "2024-05-01"], "integer", r"line 3, column 'timestamp': must hold integers, got '2024-05-01'"),
])
def test_timestamp_refusals_name_the_line(tmp_path, cells, timestamps, want):
    events = "user_id,item_id,timestamp,label,item_text\n" + "".join(f"u0,{i},{c},1,t{i}\n" for i, c in enumerate(cells))
    (tmp_path / "log.csv").write_text(events)
    with pytest.raises(LogFormatError, match=rf"log.csv: {want}"):
        load_log(tmp_path / "log.csv", timestamps=timestamps)
    with pytest.raises(ValueError, match="timestamps must be one of"):
        load_log(tmp_path / "log.csv", timestamps="seconds")


# ----- the same options for a streamed log (`bahe train --stream`) ---------------------------------------------
def _genre_fixture(tmp_path, iso: bool):
    """The CI fixture split into events (string ids; ISO-8601 or epoch-ms timestamps) and an item catalog with an
    item-level feature (cat_genre, one per item)."""
    frame = pd.read_parquet(FIXTURE)
    frame["item_id"] = "SKU-" + frame["item_id"].astype(str)
    frame["user_id"] = "u" + frame["user_id"].astype(str)
    millis = frame["timestamp"].astype(np.int64) * 1000
    frame["timestamp"] = (pd.to_datetime(millis, unit="ms", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                          if iso else millis)
    items = frame[["item_id", "item_text"]].drop_duplicates().reset_index(drop=True)
    items["cat_genre"] = [text.rsplit("|", 1)[-1].strip() for text in items["item_text"]]
    frame.drop(columns="item_text").to_csv(tmp_path / "events.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    return tmp_path / "events.csv", tmp_path / "items.csv"


@pytest.mark.parametrize("iso", [False, True])
def test_a_streamed_log_takes_a_catalog_and_timestamps_as_load_log_does(tmp_path, iso):
    from engine.training.data.item_features import item_level_features
    from engine.training.streaming.stream import StreamConfig, prepare_stream
    events, items = _genre_fixture(tmp_path, iso)
    kind = "iso8601" if iso else "integer"
    memory = load_log(events, catalog=items, timestamps=kind)
    for timestamps in ("auto", kind):
        stream = prepare_stream(events, tmp_path / "work", StreamConfig(shards=3, time_buckets=4, batch_rows=61),
                                catalog=items, timestamps=timestamps)
        assert stream.item_texts == memory.item_texts and stream.item_keys.tolist() == memory.item_keys.tolist()
        assert stream.categorical == tuple(memory.categorical) and "genre" in stream.categorical
        assert stream.item_features == item_level_features(memory)  # the user's gender, age ... are not item-level
        assert list(stream.item_features) == ["genre"] and len(stream.item_features["genre"]) == len(memory.item_ids)
        assert (stream.val_start, stream.test_start) == (memory.split().val_start, memory.split().test_start)
        got = sorted((k, t, g) for shard in stream for k, t, g in zip(
            shard.log.item_key(shard.log.item), shard.log.timestamp.tolist(),
            shard.log.category_values("genre", np.arange(shard.log.num_events))))
        want = sorted(zip(memory.item_key(memory.item), memory.timestamp.tolist(),
                          memory.category_values("genre", np.arange(memory.num_events))))
        assert got == want


def _edit(path, line: int, column: str, value: str) -> None:
    """Set one cell of file line `line` (header = line 1) of a CSV file without quoted line breaks."""
    lines = path.read_text().split("\n")
    header = lines[0].split(",")
    cells = next(csv.reader([lines[line - 1]]))
    cells[header.index(column)] = value
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(cells)
    lines[line - 1] = out.getvalue()
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("edit,timestamps,want", [
    (("events", 301, "item_id", "SKU-0"), "auto", "line 301, column 'item_id': item 'SKU-0' is not in the catalog"),
    (("items", 5, "item_id", "SKU-286"), "auto", "line 5, column 'item_id': item 'SKU-286' is listed twice"),
    (None, "iso8601", "line 2, column 'timestamp': '888549960000' is not an ISO-8601 time"),
    (("events", 301, "timestamp", "2024-05-01"), "auto", "line 301, column 'timestamp': must hold integers"),
])
def test_catalog_and_timestamp_refusals_in_a_stream_are_load_logs(tmp_path, edit, timestamps, want):
    from engine.training.streaming.stream import StreamConfig, prepare_stream
    files = dict(zip(("events", "items"), _genre_fixture(tmp_path, iso=False)))
    if edit is not None:
        _edit(files[edit[0]], *edit[1:])
    with pytest.raises(LogFormatError) as whole:
        load_log(files["events"], catalog=files["items"], timestamps=timestamps)
    assert want in str(whole.value)
    with pytest.raises(LogFormatError) as streamed:
        prepare_stream(files["events"], tmp_path / "work", StreamConfig(shards=2, batch_rows=50),
                       catalog=files["items"], timestamps=timestamps)
    assert str(streamed.value) == str(whole.value)


def test_bahe_train_stream_with_a_catalog_and_iso_timestamps(tiny_checkpoints, tmp_path, capsys):
    """Before, `--stream` refused `--catalog` and `--timestamps`; now the scorer's ids.json holds the catalog's
    items, their texts and their item-level features, as `bahe train` without --stream saves them."""
    from engine import cli
    from weights.id_vocabulary import FILE_NAME, VocabularyFile
    events, items = _genre_fixture(tmp_path, iso=True)
    common = ["--model", str(tiny_checkpoints["llama"]), "--lower-layers", "2", "--max-behaviors", "8", "--epochs",
              "1", "--device", "cpu", "--catalog", str(items), "--timestamps", "iso8601", "--data", str(events)]
    cli.main(["train", *common, "--out", str(tmp_path / "streamed"), "--stream", str(tmp_path / "work"), "--shards",
              "2", "--steps-per-shard", "2", "--eval-per-shard", "20"])
    assert "test AUC" in capsys.readouterr().out
    cli.main(["train", *common, "--out", str(tmp_path / "whole"), "--train-examples", "64", "--val-examples", "32",
              "--test-examples", "32"])
    streamed = VocabularyFile.read(tmp_path / "streamed" / "scorer" / FILE_NAME)
    whole = VocabularyFile.read(tmp_path / "whole" / "scorer" / FILE_NAME)
    catalog = pd.read_csv(items, dtype=str)
    assert dict(zip(streamed.items.keys, streamed.item_texts)) == dict(zip(catalog["item_id"], catalog["item_text"]))
    assert streamed.features_of("SKU-1") == whole.features_of("SKU-1") == {
        "genre": catalog.set_index("item_id").loc["SKU-1", "cat_genre"]}
    assert sorted(streamed.users.keys) == sorted(whole.users.keys)


@pytest.mark.slow  # trains a scorer, then updates it twice
@pytest.mark.parametrize("stream", [False, True])
def test_bahe_update_reads_a_catalog_log_as_bahe_train_does(tiny_checkpoints, tmp_path, capsys, stream):
    """A scorer trained on events + an item catalog (ISO-8601 times) is updated on the next period's events in the
    same format: `bahe update --catalog --timestamps`, in memory and streamed; NEXT holds the catalog's items."""
    from engine import cli
    from engine.deploy.versions import ScorerVersions
    from weights.id_vocabulary import FILE_NAME, VocabularyFile
    events, items = _genre_fixture(tmp_path, iso=True)
    frame = pd.read_csv(events, dtype=str)
    times = pd.to_datetime(frame["timestamp"])
    cut = times.sort_values().iloc[400]
    old, new = frame[times < cut], frame[times >= cut]  # the new period starts after the old one ends
    old.to_csv(tmp_path / "old.csv", index=False)
    new.to_csv(tmp_path / "new.csv", index=False)
    log_format = ["--catalog", str(items), "--timestamps", "iso8601"]
    cli.main(["train", "--model", str(tiny_checkpoints["llama"]), "--lower-layers", "2", "--max-behaviors", "8",
              "--epochs", "1", "--device", "cpu", "--data", str(tmp_path / "old.csv"), *log_format,
              "--out", str(tmp_path / "run")])
    root = tmp_path / "root"
    extra = (["--stream", str(tmp_path / "work"), "--shards", "2"] if stream
             else ["--history", str(tmp_path / "old.csv")])
    cli.main(["update", "--scorer", str(tmp_path / "run" / "scorer"), "--out", str(root), "--data",
              str(tmp_path / "new.csv"), *log_format, "--epochs", "1", "--force", "--device", "cpu", *extra])
    assert "published v000002" in capsys.readouterr().out
    nxt = VocabularyFile.read(ScorerVersions(root).current().path / FILE_NAME)
    catalog = pd.read_csv(items, dtype=str).set_index("item_id")
    held = set(old["item_id"]) | set(new["item_id"])
    assert held <= set(nxt.items.keys)
    assert all(nxt.text_of(key) == catalog.loc[key, "item_text"] for key in held)
    with pytest.raises(SystemExit, match="timestamp"):  # the format is read, not guessed: integers refused
        cli.main(["update", "--out", str(root), "--data", str(tmp_path / "new.csv"), "--catalog", str(items),
                  "--timestamps", "integer", "--epochs", "1", "--device", "cpu"])
