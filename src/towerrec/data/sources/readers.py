"""Readers every file-based source shares: tables, header-less line files, images, canonical frames.

A source module (``hm``, ``movielens``, ``table``) knows its own file names and column names; these
helpers know none. Each keeps ids as strings and the source row order, and raises a one-line
:class:`~towerrec.data.schema.DataError` on input it cannot trust.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from towerrec.data import engine
from towerrec.data.schema import INTERACTION_COLUMNS, INTERACTION_OPTIONAL, DataError
from towerrec.data.validate import (
    parse_numbers,
    parse_timestamps,
    read_csv_chunks,
    read_csv_utf8,
    require_columns,
    require_ids,
    to_id_str,
)


def scan_images(folder: Path, suffix: str = ".jpg") -> dict[str, str]:
    """Map file stem -> absolute path for every ``*suffix`` file under ``folder`` (any depth)."""
    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    stack = [os.fspath(folder.resolve())]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.name.endswith(suffix):
                    found[entry.name[: -len(suffix)]] = entry.path
    return found


def ordered_union(*parts: Iterable[str]) -> pd.Index:
    """Ids in order of first appearance across ``parts``."""
    uniques = [pd.Series(pd.unique(pd.Series(p, dtype=str).to_numpy()), dtype=str) for p in parts]
    values = pd.concat(uniques, ignore_index=True) if uniques else pd.Series([], dtype=str)
    return pd.Index(values.unique(), dtype=object)


def build_items(
    ids: pd.Index, meta: pd.DataFrame | None, fields: list[str], images: dict[str, str]
) -> pd.DataFrame:
    """One row per id: metadata fields from ``meta`` ("" where absent) and ``image_path`` (or None)."""
    items = pd.DataFrame({"item_id": pd.Series(ids, dtype=str)})
    if meta is not None and fields:
        table = meta.set_index("item_id")[fields].reindex(ids)
        for f in fields:
            items[f] = table[f].fillna("").astype(str).to_numpy()
    else:
        for f in fields:
            items[f] = ""
    items["image_path"] = pd.Series([images.get(i) for i in ids], dtype=object)
    return items


def to_channel(series: pd.Series) -> pd.Series:
    """Integer channel codes where every value is an integer, otherwise strings ("" for missing)."""
    numbers = pd.to_numeric(series, errors="coerce")
    values = numbers.to_numpy(dtype=float, na_value=np.nan)
    if np.isfinite(values).all() and (values == np.round(values)).all():
        return numbers.astype("int64")
    return series.astype(str).where(series.notna(), "")


def finish_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical column order, string ids, a fresh RangeIndex."""
    order = [c for c in INTERACTION_COLUMNS + INTERACTION_OPTIONAL if c in df]
    order += [c for c in df.columns if c not in order]
    df = df[order].reset_index(drop=True)
    return df.astype({"user_id": str, "item_id": str})


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV/TSV (all columns as strings) or parquet file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return read_csv_utf8(path, dtype=str, sep="\t" if suffix == ".tsv" else ",")
    if suffix in (".parquet", ".pq"):
        if not path.is_file():
            raise DataError(f"{path.name}: file not found ({path})")
        try:
            return pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path.name}: unreadable parquet file: {msg}") from None
    raise DataError(f"{path.name}: unsupported file type {suffix!r} (use .csv, .tsv or .parquet)")


#: Rows a source validates in pandas at a time before they go into the engine.
CHUNK_ROWS = 1_000_000


def table_chunks(path: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """:func:`read_table` a chunk at a time; each chunk's index is its rows' 0-based position in the file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        yield from read_csv_chunks(path, chunk_rows, dtype=str, sep="\t" if suffix == ".tsv" else ",")
        return
    if suffix not in (".parquet", ".pq"):
        raise DataError(f"{path.name}: unsupported file type {suffix!r} (use .csv, .tsv or .parquet)")
    if not path.is_file():
        raise DataError(f"{path.name}: file not found ({path})")
    try:
        file = pq.ParquetFile(path)
        start = 0
        for batch in file.iter_batches(batch_size=chunk_rows):
            chunk = batch.to_pandas()
            chunk.index = pd.RangeIndex(start, start + len(chunk))
            start += len(chunk)
            yield chunk
        if start == 0:
            yield file.schema_arrow.empty_table().to_pandas()
    except Exception as e:  # pyarrow raises several types for a damaged file
        if isinstance(e, DataError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path.name}: unreadable parquet file: {msg}") from None


@contextmanager
def source_engine(con: duckdb.DuckDBPyConnection | None) -> Iterator[duckdb.DuckDBPyConnection]:
    """The build's engine connection, or a private in-memory one when a source is called on its own."""
    if con is not None:
        yield con
        return
    own = duckdb.connect()
    try:
        yield own
    finally:
        own.close()


def engine_interactions(
    con: duckdb.DuckDBPyConnection,
    chunks: Iterable[pd.DataFrame],
    convert: Callable[[pd.DataFrame], pd.DataFrame],
    table: str,
) -> None:
    """Validate raw chunks with ``convert`` (to canonical columns) and append them to a new engine table.

    A file with a header and no rows still goes through ``convert`` once (its columns are checked).
    """
    first = True
    for raw in chunks:
        if len(raw) or first:
            engine.append_frame(con, convert(raw), table, create=first)
            first = False
    if first:
        raise DataError(f"{table}: no rows")


def engine_result(con: duckdb.DuckDBPyConnection, table: str, given: duckdb.DuckDBPyConnection | None):
    """What a source returns as its interactions: the engine table's name in a build, else a frame."""
    return table if given is not None else finish_interactions(engine.to_frame(con, table))


def _read_lines_slowly(text: str, name: str, sep: str, names: list[str]) -> pd.DataFrame:
    """Line-by-line reader: exact line numbers for blank lines and for a wrong field count."""
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) != len(names):
            raise DataError(
                f"{name}: line {number}: expected {len(names)} fields separated by {sep!r}, found {len(fields)}"
            )
        rows.append(fields)
        line_numbers.append(number - 1)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    df = pd.DataFrame({n: pd.Series(col, dtype=str) for n, col in zip(names, columns, strict=True)})
    df.index = pd.Index(line_numbers, dtype="int64")
    return df.replace("", np.nan)


def read_lines(path: Path, sep: str, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    """Read a header-less file of ``sep``-separated fields as strings; the index is ``line number - 1``.

    Fields are not quoted (MovieLens titles contain quotes). The fast path is pandas' C parser; the
    line-by-line reader takes over to name the line of a bad row, or when there are blank lines.
    """
    if not path.is_file():
        raise DataError(f"{path.name}: file not found ({path})")
    text = path.read_bytes().decode(encoding)
    one_char = sep if len(sep) == 1 else "\x1f"
    if "\n\n" in text.replace("\r", "") or text.startswith("\n") or (one_char != sep and one_char in text):
        return _read_lines_slowly(text, path.name, sep, names)
    try:
        df = pd.read_csv(
            io.StringIO(text if one_char == sep else text.replace(sep, one_char)),
            sep=one_char,
            header=None,
            names=names,
            dtype=str,
            quoting=csv.QUOTE_NONE,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
        )
    except pd.errors.ParserError:
        return _read_lines_slowly(text, path.name, sep, names)
    # A short row leaves its last field missing; no MovieLens file has an empty last field.
    if df[names[-1]].isna().any():
        return _read_lines_slowly(text, path.name, sep, names)
    return df


def canonical_interactions(
    raw: pd.DataFrame, file: str, mapping: dict[str, str], timestamp_format: str | None = None
) -> pd.DataFrame:
    """Validate and rename the canonical interaction columns of ``raw`` (source index kept).

    Args:
        mapping: canonical name -> source column, for every column to keep.
    """
    require_columns(raw, list(mapping.values()), file)
    for canon in ("user_id", "item_id"):
        raw = raw.assign(**{mapping[canon]: to_id_str(raw[mapping[canon]])})
    require_ids(raw, [mapping["user_id"], mapping["item_id"]], file)
    out = pd.DataFrame(index=raw.index)
    out["user_id"] = raw[mapping["user_id"]]
    out["item_id"] = raw[mapping["item_id"]]
    out["timestamp"] = parse_timestamps(
        raw[mapping["timestamp"]], file, mapping["timestamp"], timestamp_format
    )
    for canon, source in mapping.items():
        if canon in out:
            continue
        if canon == "quantity":
            qty = parse_numbers(raw[source], file, source)
            if (qty <= 0).any() or (qty != np.round(qty)).any():
                row = int(raw.index[((qty <= 0) | (qty != np.round(qty))).to_numpy()][0]) + 1
                raise DataError(f"{file}: row {row}, column '{source}': quantity must be a positive integer")
            out["quantity"] = qty.astype("int64")
        elif canon == "channel":
            out["channel"] = to_channel(raw[source])
        elif canon == "rating":
            out["rating"] = parse_numbers(raw[source], file, source)
        else:
            out[canon] = raw[source]  # price is converted (and checked) by drop_invalid_prices
    return out
