"""Item catalog files (engine.training.data.log_files.join_catalog) and timestamps as integers or ISO-8601 times
(engine.training.data.log_columns): what is accepted, and the line and column of each refusal."""
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
