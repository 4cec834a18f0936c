"""Each bad-input case gives its one-line error or its counted skip."""

from __future__ import annotations

import logging
import os
from collections import Counter

import duckdb
import pandas as pd
import pytest

from towerrec.data.schema import DataError
from towerrec.data.validate import (
    dedupe_keyed,
    drop_duplicate_rows,
    drop_invalid_prices,
    drop_unknown_items,
    parse_numbers,
    parse_timestamps,
    read_csv_utf8,
    require_columns,
    require_ids,
)
from towerrec.fileio import file_fingerprint, tree_fingerprint


def test_read_csv_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "articles.csv"
    lines = ["article_id,prod_name"] + [f"{i:010d},ok" for i in range(15)]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"0000000099,caf\xe9\n")
    with pytest.raises(DataError, match=r"^articles\.csv: line 17: invalid UTF-8 byte 0xe9 .*not UTF-8 text"):
        read_csv_utf8(path, dtype=str)


def test_read_csv_utf8_keeps_na_like_ids_and_reads_empty_as_missing(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,name\nNA,\nnull,b\n", encoding="utf-8")
    df = read_csv_utf8(path, dtype=str)
    assert list(df["id"]) == ["NA", "null"]
    assert df["name"].isna().tolist() == [True, False]


def test_read_csv_utf8_malformed_and_missing(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n1,2,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^bad\.csv: malformed CSV: .*line 3"):
        read_csv_utf8(path, dtype=str)
    with pytest.raises(DataError, match=r"^nothere\.csv: file not found"):
        read_csv_utf8(tmp_path / "nothere.csv")


def test_missing_columns_listed_with_what_is_there():
    df = pd.DataFrame({"a": [1], "b": [2], "c": [3]})
    with pytest.raises(
        DataError, match=r"^transactions\.csv: missing column\(s\) 'price' \(have: a, b, c\)$"
    ):
        require_columns(df, ["a", "price"], "transactions.csv")
    require_columns(df, ["a", "b"], "transactions.csv")  # no error


@pytest.mark.parametrize("bad", [None, "", "   "])
def test_empty_id_names_file_row_and_column(bad):
    df = pd.DataFrame({"user_id": ["u1", "u2", bad, "u4"], "item_id": ["i"] * 4})
    with pytest.raises(DataError, match=r"^tx\.csv: row 3, column 'user_id': empty id$"):
        require_ids(df, ["user_id", "item_id"], "tx.csv")


def test_empty_id_counts_other_bad_rows():
    df = pd.DataFrame({"item_id": ["a", None, "", "b"]})
    with pytest.raises(DataError, match=r"row 2, column 'item_id': empty id \(and 1 more row\(s\)\)"):
        require_ids(df, ["item_id"], "tx.csv")


def test_unparsable_timestamp_names_value():
    s = pd.Series(["2020-01-01", "2020-01-02", "yesterday"], name="t_dat")
    with pytest.raises(DataError, match=r"^tx\.csv: row 3, column 't_dat': unparsable timestamp 'yesterday'"):
        parse_timestamps(s, "tx.csv", "t_dat", fmt="%Y-%m-%d")
    with pytest.raises(DataError, match=r"row 3, column 't_dat': unparsable timestamp 'yesterday'"):
        parse_timestamps(s, "tx.csv", "t_dat")


def test_missing_timestamp():
    s = pd.Series(["2020-01-01", None, ""])
    with pytest.raises(DataError, match=r"^tx\.csv: row 2, column 'ts': missing timestamp \(and 1 more"):
        parse_timestamps(s, "tx.csv", "ts")
    with pytest.raises(DataError, match=r"row 2, column 'ts': missing timestamp"):
        parse_timestamps(pd.Series([1.0, float("nan")]), "tx.csv", "ts")


def test_timestamps_parse_unix_seconds_and_dates():
    unix = parse_timestamps(pd.Series(["0", "86400"]), "f", "ts")
    assert unix.dtype == "datetime64[ns]"
    assert list(unix) == [pd.Timestamp("1970-01-01"), pd.Timestamp("1970-01-02")]
    ints = parse_timestamps(pd.Series([0, 86400]), "f", "ts")
    assert ints.equals(unix)
    dates = parse_timestamps(pd.Series(["2020-09-22", "2018-09-20"]), "f", "ts", fmt="%Y-%m-%d")
    assert dates.dtype == "datetime64[ns]"
    assert dates.iloc[0] == pd.Timestamp("2020-09-22")
    aware = pd.Series(pd.to_datetime(["2020-01-01T01:00:00+01:00"], utc=True))
    assert parse_timestamps(aware, "f", "ts").iloc[0] == pd.Timestamp("2020-01-01 00:00")


def test_timestamps_mixed_iso_precision_and_stray_word_in_unix_column():
    mixed = parse_timestamps(pd.Series(["2021-03-01 10:00", "2021-03-02"]), "f", "ts")
    assert list(mixed) == [pd.Timestamp("2021-03-01 10:00"), pd.Timestamp("2021-03-02")]
    with pytest.raises(
        DataError, match=r"row 2, column 'ts': unparsable timestamp 'noon' \(expected unix time"
    ):
        parse_timestamps(pd.Series(["881250949", "noon"]), "u.data", "ts")


def test_row_numbers_follow_the_reader_index():
    s = pd.Series(["2020-01-01", "bad"], index=[4, 9])
    with pytest.raises(DataError, match=r"row 10, column"):
        parse_timestamps(s, "f", "ts")


def _engine_table(**cols) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    frame = pd.DataFrame(cols)
    frame["row"] = range(len(frame))
    con.register("frame", frame)
    con.execute("CREATE TABLE tx AS SELECT * FROM frame")
    return con


def test_unknown_items_are_counted_skips(caplog):
    con = _engine_table(user_id=["u"] * 4, item_id=["z", "x", "b", "x"])
    skipped = Counter()
    with caplog.at_level(logging.WARNING):
        out = drop_unknown_items(con, "tx", {"z", "b"}, skipped, "tx.csv")
    assert skipped["unknown_item"] == 2
    assert con.execute(f"SELECT item_id, row FROM {out} ORDER BY row").fetchall() == [("z", 0), ("b", 2)]
    assert "tx.csv: skipped 2 row(s) (unknown_item), e.g. item_id 'x'" in caplog.text
    assert drop_unknown_items(con, out, {"z", "b"}, skipped, "tx.csv") == out  # nothing to drop: same table
    assert skipped["unknown_item"] == 2


def test_duplicate_rows_are_counted_skips(caplog):
    con = _engine_table(user_id=["u", "u", "u", "u", "u"], item_id=["a", "b", "a", "a", "a"], ts=[1, 1, 2, 1, 1])
    skipped = Counter({"unknown_item": 1})
    with caplog.at_level(logging.WARNING):
        out = drop_duplicate_rows(con, "tx", skipped, "tx.csv")
    assert skipped == Counter({"unknown_item": 1, "duplicate_row": 2})
    assert [r[0] for r in con.execute(f"SELECT row FROM {out} ORDER BY row").fetchall()] == [0, 1, 2]
    assert "skipped 2 row(s) (duplicate_row), first at row 4" in caplog.text


def test_invalid_prices_are_counted_skips():
    df = pd.DataFrame({"price": ["1.5", None, "-2", "abc", "0", "inf"]})
    skipped = Counter()
    out, n = drop_invalid_prices(df, skipped, "tx.csv")
    assert n == 4 and skipped["invalid_price"] == 4
    assert out["price"].tolist() == [1.5, 0.0]
    assert out["price"].dtype == float


def test_clean_input_records_zero_skips_without_dropping():
    con = _engine_table(item_id=["a", "b"], price=[1.0, 2.0])
    skipped = Counter()
    assert drop_duplicate_rows(con, "tx", skipped, "f") == "tx"
    assert "duplicate_row" in skipped and skipped["duplicate_row"] == 0
    out, n = drop_invalid_prices(pd.DataFrame({"item_id": ["a", "b"], "price": [1.0, 2.0]}), skipped, "f")
    assert n == 0 and len(out) == 2


def test_parse_numbers_errors():
    with pytest.raises(DataError, match=r"^u\.data: row 2, column 'rating': not a number: 'five'$"):
        parse_numbers(pd.Series(["4", "five"]), "u.data", "rating")
    with pytest.raises(DataError, match=r"row 1, column 'rating': missing value"):
        parse_numbers(pd.Series([None, "4"]), "u.data", "rating")


def test_dedupe_keyed_drops_exact_and_rejects_conflicting():
    skipped = Counter()
    df = pd.DataFrame({"item_id": ["a", "b", "a"], "name": ["x", "y", "x"]})
    out = dedupe_keyed(df, "item_id", "items.csv", skipped, "duplicate_item_row")
    assert list(out["item_id"]) == ["a", "b"] and skipped["duplicate_item_row"] == 1
    df = pd.DataFrame({"item_id": ["a", "b", "a"], "name": ["x", "y", "z"]})
    with pytest.raises(
        DataError, match=r"^items\.csv: row 3, column 'item_id': duplicate id 'a' .*first at row 1"
    ):
        dedupe_keyed(df, "item_id", "items.csv", skipped, "duplicate_item_row")


def test_file_fingerprint(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    fp = file_fingerprint(path)
    assert fp == {"bytes": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}


def test_tree_fingerprint_uses_listing_only(tmp_path):
    (tmp_path / "010").mkdir()
    (tmp_path / "010" / "0101.jpg").write_bytes(b"12345")
    (tmp_path / "0102.jpg").write_bytes(b"1")
    (tmp_path / "notes.txt").write_bytes(b"ignored")
    fp = tree_fingerprint(tmp_path, "*.jpg")
    assert fp["files"] == 2 and fp["bytes"] == 6
    # Same size and mtime, different bytes: same fingerprint (contents are not read).
    st = os.stat(tmp_path / "0102.jpg")
    (tmp_path / "0102.jpg").write_bytes(b"2")
    os.utime(tmp_path / "0102.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tree_fingerprint(tmp_path, "*.jpg") == fp
    (tmp_path / "0103.jpg").write_bytes(b"")
    assert tree_fingerprint(tmp_path, "*.jpg")["sha256"] != fp["sha256"]
    assert tree_fingerprint(tmp_path / "absent", "*.jpg")["files"] == 0
