"""Validation helpers shared by every data source.

Two kinds of bad input, two policies:

* Errors (:class:`~towerrec.data.schema.DataError`) for input that cannot be trusted at all: text that
  is not UTF-8, missing columns, missing or unparsable timestamps, empty ids. The message is one line
  naming the file and the row (1-based data row, header not counted) or line, and the column.
* Counted skips for rows that are individually wrong but leave the rest usable: unknown items,
  exact duplicate rows, NaN or negative prices. Row checks run on pandas chunks of a source (so a
  file of any length is read in bounded memory); checks across rows (duplicates, unknown items) run
  on the DuckDB engine table the chunks go into. The helper drops them, adds the count to the
  ``skipped`` counter of :class:`~towerrec.data.schema.RawDataset` under a fixed reason and logs one
  line. Nothing is dropped silently.

Row numbers come from the frame's index (``index + 1``), so keep the default ``RangeIndex`` that
reading gives until validation is done.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from towerrec.data.schema import DataError

log = logging.getLogger(__name__)

UNKNOWN_ITEM = "unknown_item"
DUPLICATE_ROW = "duplicate_row"
INVALID_PRICE = "invalid_price"

_UNIX_NUMBER = re.compile(r"^\s*-?\d+(\.\d*)?\s*$")


def _row_numbers(index: pd.Index, mask: np.ndarray) -> np.ndarray:
    """1-based data row numbers of the rows selected by ``mask``."""
    if pd.api.types.is_integer_dtype(index.dtype):
        return np.asarray(index[mask]) + 1
    return np.flatnonzero(mask) + 1


def _more(n_bad: int) -> str:
    return f" (and {n_bad - 1} more row(s))" if n_bad > 1 else ""


def _invalid_utf8_message(path: Path) -> str:
    """Locate the first byte that is not UTF-8 and describe it in one line."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                # A newline byte never occurs inside a multi-byte sequence, so decoding line by line
                # finds the same first bad byte as decoding the whole file.
                byte = line[e.start]
                return (
                    f"{path.name}: line {lineno}: invalid UTF-8 byte 0x{byte:02x} at byte offset "
                    f"{offset + e.start} (not UTF-8 text)"
                )
            offset += len(line)
    return f"{path.name}: not UTF-8 text"


@contextmanager
def _csv_reading(path: Path, kw: dict) -> Iterator[None]:
    """Check the file exists, default the NA handling, and turn pandas' read errors into one-line DataErrors."""
    kw.setdefault("keep_default_na", False)
    kw.setdefault("na_values", [""])
    if not path.is_file():
        raise DataError(f"{path.name}: file not found ({path})")
    try:
        yield
    except UnicodeDecodeError:
        raise DataError(_invalid_utf8_message(path)) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path.name}: empty file (no header row)") from None
    except pd.errors.ParserError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path.name}: malformed CSV: {first}") from None


def read_csv_chunks(path: str | os.PathLike, chunk_rows: int, **kw) -> Iterator[pd.DataFrame]:
    """:func:`read_csv_utf8` a chunk of ``chunk_rows`` rows at a time, with the same one-line errors.

    The chunks' indexes continue from one to the next, so row numbers in messages are the file's.
    """
    path = Path(path)
    with _csv_reading(path, kw), pd.read_csv(path, encoding="utf-8", chunksize=chunk_rows, **kw) as reader:
        yield from reader


def read_csv_utf8(path: str | os.PathLike, **kw) -> pd.DataFrame:
    """Read a UTF-8 CSV with pandas, turning bad bytes and malformed CSV into one-line DataErrors.

    Only empty fields count as missing (``keep_default_na=False, na_values=[""]`` unless overridden),
    so ids such as ``"NA"`` or ``"null"`` stay strings. Pass ``dtype=str`` to read columns as strings.

    Args:
        path: the CSV file.
        **kw: passed to :func:`pandas.read_csv`.
    """
    path = Path(path)
    with _csv_reading(path, kw):
        return pd.read_csv(path, encoding="utf-8", **kw)


def require_columns(df: pd.DataFrame, required: Iterable[str], file: str) -> None:
    """Raise if any of ``required`` is not a column of ``df``."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        names = ", ".join(f"'{c}'" for c in missing)
        have = ", ".join(str(c) for c in df.columns)
        raise DataError(f"{file}: missing column(s) {names} (have: {have})")


def to_id_str(series: pd.Series) -> pd.Series:
    """Convert an id column to strings, keeping missing values missing.

    Integer-valued floats (ids read from a parquet column with gaps) lose their ``.0``.
    """
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy()
        finite = np.isfinite(values)
        if np.all(values[finite] == np.round(values[finite])):
            series = series.astype("Int64")
    if pd.api.types.is_string_dtype(series.dtype) and series.dtype != object:
        return series
    out = series.astype(object).where(series.notna(), None)
    return pd.Series([None if v is None else str(v) for v in out], index=series.index, dtype=str)


def require_ids(df: pd.DataFrame, columns: Iterable[str], file: str) -> None:
    """Raise if an id column holds an empty string, whitespace only or a missing value."""
    for col in columns:
        s = df[col]
        bad = s.isna().to_numpy() | (s.astype(str).str.strip() == "").to_numpy()
        if bad.any():
            row = _row_numbers(df.index, bad)[0]
            raise DataError(f"{file}: row {row}, column '{col}': empty id{_more(int(bad.sum()))}")


def _parse_without_format(values: pd.Series) -> pd.Series:
    """ISO 8601 in any precision ("2021-03-01", "2021-03-01 10:00"), else the first value's format."""
    iso = pd.to_datetime(values, format="ISO8601", errors="coerce")
    if iso.notna().sum() == values.notna().sum():
        return iso
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "could not infer format": we report bad rows
        inferred = pd.to_datetime(values, errors="coerce")
    return inferred if inferred.notna().sum() > iso.notna().sum() else iso


def parse_timestamps(
    series: pd.Series, file: str, column: str, fmt: str | None = None, unit: str = "s"
) -> pd.Series:
    """Parse a timestamp column to ``datetime64[ns]``; raise on a missing or unparsable value.

    Numbers (a numeric dtype, or strings when the first one is a number) are unix times in ``unit``.
    Strings are parsed with ``fmt`` when given, otherwise as ISO 8601 (any precision) or, failing
    that, with the format pandas infers from the first value.
    Time-zone aware values are converted to UTC and made naive.

    Args:
        series: the raw column, with the reader's index (used for row numbers).
        file: file name for messages.
        column: source column name for messages.
        fmt: a :func:`~datetime.datetime.strptime` format.
        unit: unit of numeric timestamps.
    """
    missing = series.isna().to_numpy()
    as_numbers = False
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        parsed = series.dt.tz_convert("UTC").dt.tz_localize(None)
    elif pd.api.types.is_datetime64_any_dtype(series.dtype):
        parsed = series
    elif pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        as_numbers = True
        parsed = pd.to_datetime(series, unit=unit, errors="coerce")
    else:
        text = series.astype(str).where(~missing, "")
        missing = missing | (text.str.strip() == "").to_numpy()
        present = text[~missing]
        values = text.where(~missing, None)
        if fmt is None and len(present) and _UNIX_NUMBER.match(present.iloc[0]):
            # The first value decides: a column of numbers is unix time, and a stray word is an error.
            as_numbers = True
            numbers = pd.to_numeric(values, errors="coerce").astype(float)
            parsed = pd.to_datetime(numbers, unit=unit, errors="coerce")
        elif fmt is not None:
            parsed = pd.to_datetime(values, format=fmt, errors="coerce")
        else:
            parsed = _parse_without_format(values)
    parsed = pd.Series(parsed, index=series.index)
    bad = parsed.isna().to_numpy() | missing
    if bad.any():
        rows = _row_numbers(series.index, bad)
        pos = int(np.flatnonzero(bad)[0])
        where = f"{file}: row {rows[0]}, column '{column}'"
        more = _more(int(bad.sum()))
        if missing[pos]:
            raise DataError(f"{where}: missing timestamp{more}")
        if as_numbers:
            hint = f" (expected unix time in {unit!r})"
        elif fmt:
            hint = f" (expected format {fmt!r})"
        else:
            hint = " (pass a timestamp format if the dates are not ISO 8601)"
        raise DataError(f"{where}: unparsable timestamp {series.iloc[pos]!r}{hint}{more}")
    return parsed.astype("datetime64[ns]")


def _count_skip(skipped: Counter, reason: str, n: int, file: str, detail: str = "") -> None:
    skipped[reason] += n  # a zero count still records that the check ran
    if n:
        log.warning("%s: skipped %d row(s) (%s)%s", file, n, reason, detail)


def drop_unknown_items(
    con: duckdb.DuckDBPyConnection,
    table: str,
    catalog: Iterable[str],
    skipped: Counter,
    file: str,
    column: str = "item_id",
) -> str:
    """Drop engine rows whose item is not in ``catalog``; count them as ``unknown_item``.

    Returns:
        the engine table without them (``table`` itself when there are none).
    """
    con.register("_catalog", pd.DataFrame({"id": pd.Series(list(catalog), dtype=object).astype(str)}))
    try:
        unknown = f"{column} NOT IN (SELECT id FROM _catalog)"
        n = int(con.execute(f"SELECT count(*) FROM {table} WHERE {unknown}").fetchall()[0][0])
        detail = ""
        if n:
            first = con.execute(
                f"SELECT {column} FROM {table} WHERE {unknown} GROUP BY {column} ORDER BY min(row) LIMIT 3"
            ).fetchall()
            detail = f", e.g. {column} " + ", ".join(repr(v[0]) for v in first)
            con.execute(f"CREATE TABLE {table}_known AS SELECT * FROM {table} WHERE NOT ({unknown}) ORDER BY row")
    finally:
        con.unregister("_catalog")
    _count_skip(skipped, UNKNOWN_ITEM, n, file, detail)
    return f"{table}_known" if n else table


def drop_duplicate_rows(con: duckdb.DuckDBPyConnection, table: str, skipped: Counter, file: str) -> str:
    """Drop exact repeats of an earlier engine row (all columns but the position; the first is kept).

    They are counted as ``duplicate_row``; the message names the first repeat's row.

    Returns:
        the engine table without them (``table`` itself when there are none).
    """
    cols = ", ".join(f'"{c}"' for c in engine_columns(con, table) if c != "row")
    repeats = f"SELECT row FROM (SELECT row, row_number() OVER (PARTITION BY {cols} ORDER BY row) AS k FROM {table}) WHERE k > 1"
    n, first = con.execute(f"SELECT count(*), min(row) FROM ({repeats})").fetchall()[0]
    n = int(n)
    detail = f", first at row {int(first) + 1}" if n else ""
    if n:
        con.execute(
            f"CREATE TABLE {table}_unique AS SELECT * FROM {table} WHERE row NOT IN ({repeats}) ORDER BY row"
        )
    _count_skip(skipped, DUPLICATE_ROW, n, file, detail)
    return f"{table}_unique" if n else table


def engine_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """Column names of an engine table."""
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def _drop_exact(df: pd.DataFrame, skipped: Counter, file: str, reason: str) -> tuple[pd.DataFrame, int]:
    """Drop exact repeats of an earlier row of a small keyed table (items, users); count them."""
    dup = df.duplicated(keep="first")
    n = int(dup.sum())
    detail = f", first at row {_row_numbers(df.index, dup.to_numpy())[0]}" if n else ""
    _count_skip(skipped, reason, n, file, detail)
    return (df[~dup] if n else df), n


def drop_invalid_prices(
    df: pd.DataFrame, skipped: Counter, file: str, column: str = "price"
) -> tuple[pd.DataFrame, int]:
    """Convert ``column`` to float and drop NaN, infinite, negative or non-numeric prices.

    The dropped rows are counted as ``invalid_price``.
    """
    price = pd.to_numeric(df[column], errors="coerce").astype(float)
    bad = ~np.isfinite(price.to_numpy()) | (price.to_numpy() < 0)
    n = int(bad.sum())
    detail = f", first at row {_row_numbers(df.index, bad)[0]}" if n else ""
    _count_skip(skipped, INVALID_PRICE, n, file, detail)
    df = df.assign(**{column: price})
    return (df[~bad] if n else df), n


def parse_numbers(series: pd.Series, file: str, column: str) -> pd.Series:
    """Convert a required numeric column (a rating, a quantity) to float; raise on a bad value."""
    values = pd.to_numeric(series, errors="coerce").astype(float)
    bad = ~np.isfinite(values.to_numpy())
    if bad.any():
        row = _row_numbers(series.index, bad)[0]
        value = series[bad].iloc[0]
        what = "missing value" if pd.isna(value) or str(value).strip() == "" else f"not a number: {value!r}"
        raise DataError(f"{file}: row {row}, column '{column}': {what}{_more(int(bad.sum()))}")
    return values


def dedupe_keyed(df: pd.DataFrame, column: str, file: str, skipped: Counter, reason: str) -> pd.DataFrame:
    """Make ``column`` a unique key: drop exact repeats of a row (counted), raise on conflicting ones.

    Args:
        df: a keyed table (items, users), after :func:`require_ids`.
        column: the key column.
        file: file name for messages.
        skipped: the dataset's skip counter.
        reason: skip reason for exact repeats, e.g. ``"duplicate_item_row"``.
    """
    df, _ = _drop_exact(df, skipped, file, reason)
    dup = df.duplicated(subset=[column], keep="first").to_numpy()
    if dup.any():
        row = _row_numbers(df.index, dup)[0]
        key = df[column][dup].iloc[0]
        first = _row_numbers(df.index, (df[column] == key).to_numpy())[0]
        raise DataError(
            f"{file}: row {row}, column '{column}': duplicate id {key!r} with different values "
            f"(first at row {first}){_more(int(dup.sum()))}"
        )
    return df
