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


# ----- values: timestamps are exact int64 or refused; ids are exact keys (strings or integers) ---------------
@FILES
@given(row=st.integers(0, len(ROWS) - 1),
       value=st.one_of(st.integers(INT64_MAX + 1, 2 ** 80), st.integers(-2 ** 80, INT64_MIN - 1)))
def test_timestamps_outside_int64_are_refused(tmp_path, row, value):
    """Before: a timestamp of 2^63 wrapped negative, so later events sorted first and histories saw the future."""
    path = _write_csv(tmp_path, _with_cell(row, "timestamp", str(value)))
    with pytest.raises(LogFormatError, match=rf"log.csv: line {row + 2}, column 'timestamp': {value} is outside the "
                                             r"int64 range"):
        load_log(path)


@FILES
@given(column=st.sampled_from(["user_id", "item_id"]), row=st.integers(0, len(ROWS) - 1),
       value=st.one_of(st.integers(INT64_MAX + 1, 2 ** 80), st.integers(-2 ** 80, INT64_MIN - 1),
                       st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),
                       st.sampled_from(["nan", "inf", "1.5e0", "x", "0x10", "1_000", "true", "017", "+1", "1.0",
                                        "9007199254740993.0", "u-\u00e9"])))
def test_ids_beyond_int64_or_not_integers_are_kept_exactly(tmp_path, column, row, value):
    """Before: an id beyond int64 merged users into one (a numpy warning only), and string ids were refused. Now
    every cell is an exact key: equal keys share a code, different keys never do."""
    path = _write_csv(tmp_path, _with_cell(row, column, str(value)))
    log = load_log(path, min_history=0)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    codes, keys = (log.user, log.user_keys) if column == "user_id" else (log.item, log.item_keys)
    assert keys is not None  # str(value) is not a canonical int64: the column is keyed
    assert sorted(keys[codes].tolist()) == sorted(frame[column].tolist())
    assert len(set(codes.tolist())) == len(set(frame[column]))


@FILES
@given(column=st.sampled_from(INTEGER_COLUMNS), row=st.integers(0, len(ROWS) - 1),
       value=st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from([INT64_MIN, INT64_MAX, 2 ** 53 + 1])))
def test_every_int64_id_and_timestamp_is_read_exactly(tmp_path, column, row, value):
    path = _write_csv(tmp_path, _with_cell(row, column, str(value)))
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    log = load_log(path, min_history=0)
    field = {"user_id": log.user, "item_id": log.item, "timestamp": log.timestamp}[column]
    assert sorted(field.tolist()) == sorted(int(v) for v in frame[column])
    assert log.user_keys is None and log.item_keys is None  # integer ids are their own codes


@FILES
@given(row=st.integers(0, len(ROWS) - 1),
       value=st.one_of(st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),
                       st.sampled_from(["nan", "inf", "-inf", "1.5e0", "x", "0x10", "1_000", "", "true"])))
def test_non_integral_timestamps_are_refused(tmp_path, row, value):
    path = _write_csv(tmp_path, _with_cell(row, "timestamp", str(value)))
    with pytest.raises(LogFormatError, match=rf"line {row + 2}, column 'timestamp': must hold integers, got"):
        load_log(path)


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_an_empty_id_is_refused_naming_line_and_column(tmp_path, column):
    with pytest.raises(LogFormatError, match=rf"log.csv: line 4, column '{column}': an id is empty"):
        load_log(_write_csv(tmp_path, _with_cell(2, column, "")))


def test_decimal_text_is_read_exactly_and_parquet_floats_past_2_53_are_refused(tmp_path):
    """A CSV cell is read as its text: "9007199254740993.0" is that integer exactly (pandas made the column
    float64, where 2^53 + 1 reads as 2^53). A float column of a parquet file past 2^53 is refused."""
    log = load_log(_write_csv(tmp_path, _with_cell(2, "timestamp", "9007199254740993.0")), min_history=0)
    assert log.timestamp.max() == 2 ** 53 + 1
    frame = pd.read_csv(_write_csv(tmp_path, "\n".join([HEADER, *ROWS]) + "\n"), keep_default_na=False)
    frame["timestamp"] = frame["timestamp"].astype(np.float64)
    frame.loc[2, "timestamp"] = 2.0 ** 53 + 2
    frame.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(LogFormatError, match=r"log.parquet: row 2, column 'timestamp': .* too large to be an exact "
                                             r"integer"):
        load_log(tmp_path / "log.parquet")


def test_parquet_uint64_beyond_int64_is_refused(tmp_path):
    frame = pd.read_csv(_write_csv(tmp_path, "\n".join([HEADER, *ROWS]) + "\n"), keep_default_na=False)
    frame["timestamp"] = frame["timestamp"].astype(np.uint64)
    frame.loc[3, "timestamp"] = np.uint64(2 ** 63)
    frame.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(LogFormatError, match=r"log.parquet: row 3, column 'timestamp': 9223372036854775808 is "
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


# ----- strict CSV: a malformed field is an error naming its line, never a silent rewrite ----------------------
@pytest.mark.parametrize("cell", ['"Heat" (1995)', '"Heat"(1995)', '"Heat" "x"'])
def test_text_after_a_closing_quote_is_refused_naming_the_line(tmp_path, cell):
    """pandas (and pyarrow) read `"Heat" (1995)` as `Heat (1995)` without a word."""
    data = HEADER + "\n" + ROWS[0] + "\n\n" + f"3,13,170,1,{cell},liked\n"
    with pytest.raises(LogFormatError, match=r"log.csv: line 4: a quoted field goes on after its closing quote"):
        load_log(_write_csv(tmp_path, data))


def test_quotes_inside_fields_and_line_breaks_inside_quotes_are_kept_and_lines_still_counted(tmp_path):
    data = (HEADER + "\n" + '1,10,100,1,"The ""Heat"" (1995)\nsecond line",liked\n' + "\n"
            + '1,11,200,0,He said "hi",watched\n' + "1,12,x,0,Big,watched\n")
    with pytest.raises(LogFormatError, match=r"log.csv: line 6, column 'timestamp': must hold integers, got 'x'"):
        load_log(_write_csv(tmp_path, data))
    log = load_log(_write_csv(tmp_path, data.replace(",x,", ",300,")), min_history=0)
    assert sorted(log.item_texts.values()) == ['Big', 'He said "hi"', 'The "Heat" (1995)\nsecond line']


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    with pytest.raises(LogFormatError, match=r"line 1: the header names column\(s\) \['label'\] more than once"):
        load_log(_write_csv(tmp_path, HEADER + ",label\n" + ROWS[0] + ",1\n"))


@pytest.mark.parametrize("column,value,want", [
    ("label", "2", "column 'label': must be 0 or 1, got '2'"),
    ("item_text", " ", r"column 'item_text': empty \(item_id 11\)"),
    ("sequence", "x||y", "column 'sequence': must name one or more sequences"),
])
def test_value_errors_name_the_file_line_and_column(tmp_path, column, value, want):
    lines = (HEADER + "\n" + "\n".join(ROWS) + "\n").split("\n")
    data = "\n".join([*lines[:2], "", *lines[2:]])  # a blank line: rows below it sit one line lower
    data = data.replace('1,11,200,0,"Up, the film",watched',
                        {"label": '1,11,200,2,"Up, the film",watched',
                         "item_text": "1,11,200,0, ,watched", "sequence": '1,11,200,0,"Up, the film",x||y'}[column])
    with pytest.raises(LogFormatError, match=rf"log.csv: line 4, {want}"):
        load_log(_write_csv(tmp_path, data))


@FILES
@given(cells=st.lists(st.lists(st.sampled_from(["a", "", '"q,x"', '"two\nlines"', '"say ""hi"""', 'He"at', "1",
                                                '"\r\n"', "b c"]), min_size=3, max_size=3), max_size=8),
       blank=st.lists(st.booleans(), min_size=8, max_size=8), crlf=st.booleans())
def test_row_lines_match_a_record_by_record_read(cells, blank, crlf):
    """The one-pass reader finds each row's line from the newlines outside quotes; it agrees with the checked
    record-by-record pass (csv's own line count) on quoted line breaks, doubled quotes, quotes inside unquoted
    fields, blank lines and CRLF."""
    import io
    from engine.encoding import csv_rows
    end = "\r\n" if crlf else "\n"
    text = "x,y,z" + end + "".join(",".join(row) + end + (end if b else "") for row, b in zip(cells, blank))
    fast = csv_rows._parse_fast(text.encode(), text)
    (checked,) = csv_rows._records(io.StringIO(text, newline=""), "log.csv", ValueError, 0)
    if fast is not None:
        assert fast[0] == checked[0] and fast[1] == checked[1] and list(fast[2]) == list(checked[2])
    assert all(a < b for a, b in zip(checked[2], checked[2][1:]))


def test_the_one_pass_reader_takes_quoted_line_breaks_and_doubled_quotes():
    from engine.encoding import csv_rows
    text = 'x,y\r\n"a\r\nb","say ""hi"""\r\n\r\n1,2\r\n'
    header, rows, lines = csv_rows._parse_fast(text.encode(), text)
    assert header == ["x", "y"] and rows == [["a\r\nb", 'say "hi"'], ["1", "2"]] and lines.tolist() == [2, 5]
    assert csv_rows._parse_fast(b'x,y\n1,He"at\n', 'x,y\n1,He"at\n') is None  # left to the checked pass
