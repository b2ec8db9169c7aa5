"""`bahe train --data log.csv|parquet`: a log file that is not a table in the schema is a LogFormatError naming
the file and (for a CSV file's structure) the line, or the row and column of the first bad value; nothing from
pandas, pyarrow or the codec leaks, and no value is silently changed (ids and timestamps are exact int64)."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.training.data.log import BehaviorLog
from engine.training.data.log_files import load_log, write_log
from engine.training.data.log_schema import LogFormatError

HEADER = "user_id,item_id,timestamp,label,item_text,sequence"
ROWS = ["1,10,100,1,Heat (1995) | Action,liked", "1,11,200,0,\"Up, the film\",watched",
        "2,10,150,1,Heat (1995) | Action,liked|watched", "2,12,160,0,Big (1988),watched"]
INTEGER_COLUMNS = ("user_id", "item_id", "timestamp")
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
FILES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write_csv(tmp_path, text: str | bytes, name: str = "log.csv"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _with_cell(row: int, column: str, value: str) -> str:
    """The good CSV with one cell replaced."""
    lines = [HEADER, *ROWS]
    cells = lines[row + 1].split(",") if "\"" not in lines[row + 1] else None
    if cells is None:  # row 1 quotes a comma: rebuild it by hand
        cells = ["1", "11", "200", "0", "\"Up, the film\"", "watched"]
    cells[HEADER.split(",").index(column)] = value
    lines[row + 1] = ",".join(cells)
    return "\n".join(lines) + "\n"


# ----- values: ids and timestamps are exact int64 or refused -------------------------------------
@FILES
@given(column=st.sampled_from(INTEGER_COLUMNS), row=st.integers(0, len(ROWS) - 1),
       value=st.one_of(st.integers(INT64_MAX + 1, 2 ** 80), st.integers(-2 ** 80, INT64_MIN - 1)))
def test_ids_and_timestamps_outside_int64_are_refused(tmp_path, column, row, value):
    """Before: an id beyond int64 merged users into one (a numpy warning only); a timestamp of 2^63 wrapped
    negative, so later events sorted first and histories saw the future."""
    path = _write_csv(tmp_path, _with_cell(row, column, str(value)))
    with pytest.raises(LogFormatError, match=rf"log.csv: column '{column}' row {row} holds {value}, outside the "
                                             r"int64 range"):
        load_log(path)


@FILES
@given(column=st.sampled_from(INTEGER_COLUMNS), row=st.integers(0, len(ROWS) - 1),
       value=st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from([INT64_MIN, INT64_MAX, 2 ** 53 + 1])))
def test_every_int64_id_and_timestamp_is_read_exactly(tmp_path, column, row, value):
    path = _write_csv(tmp_path, _with_cell(row, column, str(value)))
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    log = load_log(path, min_history=0)
    field = {"user_id": log.user, "item_id": log.item, "timestamp": log.timestamp}[column]
    assert sorted(field.tolist()) == sorted(int(v) for v in frame[column])


@FILES
@given(column=st.sampled_from(INTEGER_COLUMNS), row=st.integers(0, len(ROWS) - 1),
       value=st.one_of(st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),
                       st.sampled_from(["nan", "inf", "-inf", "1.5e0", "x", "0x10", "1_000", "", "true"])))
def test_non_integral_ids_and_timestamps_are_refused(tmp_path, column, row, value):
    path = _write_csv(tmp_path, _with_cell(row, column, str(value)))
    with pytest.raises(LogFormatError, match=rf"column '{column}' must hold integers, row {row} holds"):
        load_log(path)


@pytest.mark.parametrize("value", ["9007199254740993.0", "9007199254740992.0", "-1.0e17"])
def test_floats_too_large_to_be_exact_are_refused(tmp_path, value):
    """A decimal point makes pandas read the whole column as float64, where 2^53 + 1 becomes 2^53."""
    path = _write_csv(tmp_path, _with_cell(2, "user_id", value))
    with pytest.raises(LogFormatError, match=r"column 'user_id' row 2 holds .*too large to be an exact integer"):
        load_log(path)
    assert load_log(_write_csv(tmp_path, _with_cell(2, "user_id", "12.0")), min_history=0).user.max() == 12


def test_parquet_uint64_beyond_int64_is_refused(tmp_path):
    frame = pd.read_csv(_write_csv(tmp_path, "\n".join([HEADER, *ROWS]) + "\n"), keep_default_na=False)
    frame["timestamp"] = frame["timestamp"].astype(np.uint64)
    frame.loc[3, "timestamp"] = np.uint64(2 ** 63)
    frame.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(LogFormatError, match=r"log.parquet: column 'timestamp' row 3 holds 9223372036854775808, "
                                             r"outside the int64 range"):
        load_log(tmp_path / "log.parquet")


def test_direct_construction_refuses_uint64_beyond_int64():
    big = np.array([1, 2 ** 63], dtype=np.uint64)
    with pytest.raises(LogFormatError, match="timestamp row 1 holds 9223372036854775808, outside the int64 range"):
        BehaviorLog(np.array([1, 1]), np.array([1, 2]), big, np.array([1, 0]), np.ones((2, 1), bool),
                    {1: "a", 2: "b"}, ("s",))


# ----- structure: a CSV or parquet file that is not a table -----------------------------------
def _corrupt(kind: str, line: int) -> tuple[bytes, str]:
    """The good CSV broken at data line `line` (file line line + 2), and the message expected."""
    lines = [HEADER.encode(), *(r.encode() for r in ROWS)]
    at = line + 1
    if kind == "short":
        lines[at] = b"3,10,100"
        want = rf"line {at + 1} has 3 fields, but the header has 6"
    elif kind == "long":
        lines[at] = lines[at] + b",extra"
        want = rf"line {at + 1} has 7 fields, but the header has 6"
    elif kind == "not utf-8":
        lines[at] = lines[at].replace(b"1", b"\xff", 1)
        want = rf"line {at + 1} is not UTF-8 text \(byte 0xff"
    else:  # an open quote
        lines[at] = b"3,10,100,1,\"Heat (1995) | Action,liked"
        want = rf"line {at + 1}: a quoted field is never closed"
    return b"\n".join(lines) + b"\n", want


@FILES
@given(kind=st.sampled_from(["short", "long", "not utf-8", "open quote"]),
       line=st.integers(0, len(ROWS) - 1), gz=st.booleans())
def test_broken_csv_structure_names_the_file_and_line(tmp_path, kind, line, gz):
    import gzip
    data, want = _corrupt(kind, line)
    if kind == "open quote":  # the quote swallows the rest of the file: make it the last line
        data = b"\n".join(data.split(b"\n")[:line + 2]) + b"\n"
    name = "log.csv.gz" if gz else "log.csv"
    path = _write_csv(tmp_path, gzip.compress(data) if gz else data, name)
    with pytest.raises(LogFormatError, match=rf"{name}: {want}"):
        load_log(path)


def test_every_row_one_field_longer_than_the_header_is_refused(tmp_path):
    """pandas would take the first column as the index and shift every column by one, silently."""
    data = "user_id,item_id,timestamp,label,item_text\n" + "".join(f"0,{r}\n" for r in (
        "1,10,100,1,a", "1,11,200,0,b"))
    with pytest.raises(LogFormatError, match="line 2 has 6 fields, but the header has 5"):
        load_log(_write_csv(tmp_path, data))


@pytest.mark.parametrize("data,match", [
    (b"", "the file is empty"),
    (b"\n\n", "the file is empty"),
    ((HEADER + "\n").encode(), "the table has no rows"),
    (b"\x00\x01\x02\xff\xfe", "line 1 is not UTF-8 text"),
    (b"\x1f\x8b\x08\x00garbage", "line 1 is not UTF-8 text"),
])
def test_empty_or_binary_csv_files(tmp_path, data, match):
    with pytest.raises(LogFormatError, match=f"log.csv: {match}"):
        load_log(_write_csv(tmp_path, data))


def test_a_bom_is_read_as_plain_utf8(tmp_path):
    log = load_log(_write_csv(tmp_path, b"\xef\xbb\xbf" + ("\n".join([HEADER, *ROWS]) + "\n").encode()))
    assert log.num_events == len(ROWS)


@FILES
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000))
def test_damaged_parquet_files_are_log_format_errors(tmp_path, cut, flip):
    path = tmp_path / "log.parquet"
    write_log(load_log(_write_csv(tmp_path, "\n".join([HEADER, *ROWS]) + "\n"), min_history=0), path)
    raw = bytearray(path.read_bytes())
    raw[flip % len(raw)] ^= 0xFF
    path.write_bytes(bytes(raw[:cut % (len(raw) + 1)]))
    try:
        load_log(path)
    except LogFormatError as err:
        assert str(err).startswith(f"{path}: ")


def test_gzip_that_is_not_gzip(tmp_path):
    with pytest.raises(LogFormatError, match=r"log.csv.gz: not a readable CSV file \(BadGzipFile"):
        load_log(_write_csv(tmp_path, b"not gzip at all", "log.csv.gz"))
