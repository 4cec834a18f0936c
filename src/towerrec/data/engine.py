"""DuckDB, the out-of-core engine of data preparation: a memory limit, a spill folder, a few helpers.

Interactions are the one table that grows with a shop's history (tens to hundreds of millions of
rows), so every step on them (validation, repeats, filters, id maps, the split, the sort, counts) is a
DuckDB query on a database file in a scratch folder: DuckDB keeps at most ``memory_limit`` in memory
and spills sorts, joins, aggregates and window functions to disk beyond it. Items and customers are
small enough for pandas.

Inside the engine an interaction table has the canonical columns ``user_id`` and ``item_id``
(VARCHAR), ``ts`` (BIGINT, nanoseconds since the epoch: exact, and the same integers pandas uses),
optionally ``price`` (DOUBLE), ``quantity`` (BIGINT) and ``channel``, and ``row`` (BIGINT), the
position in the source, which breaks timestamp ties as the stable sort of the source order did.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

NS_PER_DAY = 86_400 * 1_000_000_000
OPTIONAL = ("price", "quantity", "channel")
# DuckDB's limit while a source appends its chunks, and while code outside DuckDB works (memory_lowered).
LOAD_LIMIT = "256MB"
RELEASED_LIMIT = "32MB"


@dataclass(frozen=True)
class EngineSettings:
    """DuckDB's resources while preparing (they change how fast, never what is written).

    Attributes:
        memory_limit: DuckDB's memory limit (``"512MB"``); what does not fit spills to disk. Pandas
            holds the users' aggregates and the items beside it, so leave room for those.
        threads: DuckDB threads; 0 takes every core.
        spill_dir: folder for the scratch database and the spill files; by default beside the
            processed folder (``.<name>.spill-*``), removed when the build ends.
    """

    memory_limit: str = "512MB"
    threads: int = 0
    spill_dir: str | None = None


@contextmanager
def connect(settings: EngineSettings, scratch: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection to a database file in ``scratch`` (created, then removed with its spill files)."""
    scratch.mkdir(parents=True, exist_ok=True)
    config = {
        "memory_limit": settings.memory_limit,
        "temp_directory": str(scratch / "spill"),
        "preserve_insertion_order": True,
    }
    if settings.threads:
        config["threads"] = settings.threads
    con = duckdb.connect(str(scratch / "prepare.duckdb"), config=config)
    try:
        yield con
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def memory_lowered(con: duckdb.DuckDBPyConnection, limit: str, settings: EngineSettings) -> Iterator[None]:
    """DuckDB's memory limit lowered to ``limit`` inside, back to ``settings.memory_limit`` on exit.

    DuckDB keeps pages in memory up to its limit after the statements that wrote or read them. Around
    code that holds large arrays of its own beside the connection (a source appending chunks from
    Python, numpy passes over written files), a lower limit evicts those pages (the tables stay in the
    scratch database and reload on their next query), so the two peaks do not add up.
    """
    try:
        con.execute(f"SET memory_limit = '{limit}'")
    except duckdb.Error as err:  # pages still pinned: the same work, with the usual limit
        log.debug("DuckDB's memory limit stays %s: %s", settings.memory_limit, err)
    try:
        yield
    finally:
        con.execute(f"SET memory_limit = '{settings.memory_limit}'")


def scratch_folder(processed_dir: Path, settings: EngineSettings) -> Path:
    """A fresh scratch folder name for one build (see :class:`EngineSettings`)."""
    parent = Path(settings.spill_dir) if settings.spill_dir else processed_dir.parent
    return parent / f".{processed_dir.name}.spill-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def frame_to_table(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame, table: str) -> None:
    """Load canonical interactions from pandas (``timestamp`` datetime64[ns], rows in source order)."""
    append_frame(con, frame, table, first_row=0, create=True)


def append_frame(
    con: duckdb.DuckDBPyConnection,
    frame: pd.DataFrame,
    table: str,
    first_row: int | None = None,
    create: bool = False,
) -> None:
    """Add canonical interactions from pandas to an engine table.

    ``timestamp`` (datetime64[ns]) becomes ``ts``; every other column is kept as it is.

    Args:
        first_row: the source position of the frame's first row (then rows are consecutive); by
            default the frame's index is the source position (0-based, as a source reader gives it).
        create: create (or replace) the table from this frame instead of appending to it.
    """
    cols = {
        "user_id": frame["user_id"].astype(str).to_numpy(dtype=object),
        "item_id": frame["item_id"].astype(str).to_numpy(dtype=object),
        "ts": frame["timestamp"].to_numpy(dtype="datetime64[ns]").view("i8"),
    }
    for c in frame.columns:
        if c not in cols and c != "timestamp":
            cols[c] = frame[c].to_numpy()
    if first_row is None:
        cols["row"] = frame.index.to_numpy(dtype=np.int64)
    else:
        cols["row"] = np.arange(first_row, first_row + len(frame), dtype=np.int64)
    view = pd.DataFrame(cols)
    con.register("_frame", view)
    try:
        if create:
            con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _frame")
        else:
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _frame")
    finally:
        con.unregister("_frame")


def load_chunks(con: duckdb.DuckDBPyConnection, chunks: Iterable[pd.DataFrame], table: str) -> int:
    """Append canonical chunks (each indexed by source position) to a new engine table; the row count."""
    n = 0
    for k, chunk in enumerate(chunks):
        append_frame(con, chunk, table, create=k == 0)
        n += len(chunk)
    return n


def to_frame(con: duckdb.DuckDBPyConnection, table: str) -> pd.DataFrame:
    """An engine table of interactions as a canonical pandas frame in source order (small data only)."""
    frame = con.execute(f"SELECT * FROM {table} ORDER BY row").df()
    frame.insert(2, "timestamp", frame.pop("ts").to_numpy(dtype=np.int64).view("datetime64[ns]"))
    return frame.drop(columns="row")


def columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """Column names of ``table``."""
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    """The first value of the first row of a query."""
    return con.execute(sql, params or []).fetchall()[0][0]  # all rows: DuckDB wants every result finished


def count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(scalar(con, f"SELECT count(*) FROM {table}"))


def day_sql(column: str = "ts") -> str:
    """SQL: the day number (floor of nanoseconds / one day, also before 1970) of ``column``."""
    return f"(CASE WHEN {column} >= 0 THEN {column} // {NS_PER_DAY} ELSE -((-{column} - 1) // {NS_PER_DAY}) - 1 END)"
