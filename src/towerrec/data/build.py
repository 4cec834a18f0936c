"""Raw source -> validated, split, id-mapped tables + image cache + manifest, in one folder.

Layout of a processed folder::

    interactions.parquet  user_idx, item_idx, timestamp, split (train|val|test), [price, quantity, channel]
    items.parquet         item_idx, item_id, categorical fields, text, image_path, has_image,
                          train_count, is_cold
    users.parquet         user_idx, user_id, attributes, n_train, RFM and lifecycle segments
    item_categorical.npy  (n_items + 1, n_fields) int64, 0 = unknown
    item_text.npy         (n_items + 1, max_tokens) int64 hashed token ids, 0 = padding
    images.npy            (n_items + 1, S, S, 3) uint8, memory-mapped
    vocab.json            categorical vocabularies
    manifest.json         inputs, counts, split, skipped/repaired rows by reason, and every other
                          file with its size and sha256 (see :mod:`towerrec.data.manifest`)

Ids are contiguous integers from 1; 0 is padding. Interactions are sorted by user, then time;
rows with the same timestamp keep their source row order (a stable sort), since H&M dates have no
time of day and the order within a day is unknown.

Out of core: the interactions never sit in pandas whole. The source validates them in chunks into a
DuckDB database in a scratch folder (:mod:`towerrec.data.engine`), and every step across rows here
(timestamp outliers, filters, id maps, the split, the sort, counts, per-customer aggregates) is a
query on it under the configured memory limit, spilling to disk. Items and users are pandas frames.

Any number of processes may prepare (or train on) one folder at once: the builder holds a file lock
beside it (``<processed_dir>.lock``), writes into a temporary folder of its own and renames it into
place when complete, so a crash or kill leaves the previous complete folder or none. The others wait
for the lock and then use what it built.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import socket
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import duckdb
import filelock
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from towerrec.data import engine
from towerrec.data.image_cache import build_image_cache
from towerrec.data.manifest import MANIFEST, read_manifest, verify_processed
from towerrec.data.schema import DataError, RawDataset
from towerrec.data.sequences import load_sequences, train_item_counts, write_sequences
from towerrec.data.settings import (
    PREPARE_VERSION,
    PrepareSettings,
    SplitSettings,
    TimeSettings,
    config_hash,
    rolling_cuts,
)
from towerrec.fileio import atomic_folder, folder_files, tree_fingerprint, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # split codes 0, 1, 2
LIFECYCLE = ["new", "active", "lapsing", "no_history"]
RFM_SEGMENTS = ["none"] + [f"R{r}F{f}M{m}" for r in (1, 2, 3) for f in (1, 2, 3) for m in (1, 2, 3)]
TIMESTAMP_AFTER_CLOCK = "timestamp_after_clock"
TIMESTAMP_ISOLATED_TAIL = "timestamp_isolated_tail"
_TOKEN = re.compile(r"[a-z0-9]+")

__all__ = [
    "PREPARE_VERSION",
    "SPLITS",
    "PrepareSettings",
    "config_hash",
    "ensure_prepared",
    "is_up_to_date",
    "prepare",
    "read_manifest",
]


# ----------------------------------------------------------------------------- staleness
def _settings(data: PrepareSettings | DictConfig) -> PrepareSettings:
    return data if isinstance(data, PrepareSettings) else PrepareSettings.from_config(data)


def is_up_to_date(data: PrepareSettings | DictConfig) -> bool:
    """True when the processed folder is complete and its manifest matches the config and inputs."""
    settings = _settings(data)
    manifest = read_manifest(settings.processed_dir)
    return (
        manifest is not None
        and "sequences" in manifest  # folders from before the memory-mapped sequences are rebuilt
        and manifest.get("config_hash") == settings.config_hash
        and manifest.get("inputs") == tree_fingerprint(settings.root)
        and verify_processed(settings.processed_dir, manifest) is None
    )


def lock_path(processed_dir: str | Path) -> Path:
    """The lock file beside a processed folder: ``<processed_dir>.lock``."""
    out = Path(processed_dir)
    return out.with_name(out.name + ".lock")


def _build_id(processed_dir: Path) -> str | None:
    manifest = read_manifest(processed_dir)
    return manifest.get("build", {}).get("id") if manifest else None


def _acquire(lock: filelock.FileLock, out: Path) -> None:
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("%s: another process is preparing it; waiting for %s", out, lock.lock_file)
        lock.acquire()


def _remove_leftovers(out: Path) -> None:
    """Remove temporary folders that killed builds left beside ``out`` (only the lock holder builds)."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        if stale.is_dir() and any(k in stale.name for k in (".tmp-", ".old-", ".spill-")):
            log.info("removing %s, left by an interrupted prepare", stale)
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- the engine's steps
# Each step reads an engine table of canonical interactions (see towerrec.data.engine) and writes a new
# one, so nothing that grows with the interactions is held by pandas.
def time_outliers(
    con: duckdb.DuckDBPyConnection, table: str, time: TimeSettings, now_ns: int, name: str
) -> tuple[str, dict[str, Any]]:
    """Drop rows dated after ``now_ns`` (the run's clock) and an isolated tail far after the rest.

    The tail is the rows after the widest-reaching gap of more than ``time.max_gap_days`` days with no
    interaction, provided they are at most ``time.max_tail_share`` of the rows: a few rows dated years
    after the rest would otherwise define the test window and leave validation empty.

    Returns:
        the table without them, and ``{reason: rows}`` for the skip counts (both reasons always present).
    """
    if time.outliers not in ("skip", "error"):
        raise DataError(f"data.time.outliers: expected 'skip' or 'error', got {time.outliers!r}")
    total = engine.count(con, table)
    days = con.execute(
        f"SELECT {engine.day_sql()} AS day, count(*) AS n FROM {table} WHERE ts <= ? GROUP BY day ORDER BY day",
        [now_ns],
    ).fetchnumpy()
    future = total - int(days["n"].sum())
    cut = now_ns + 1  # rows at or after `cut` go
    tail = 0
    if len(days["day"]) > 1:
        gaps = np.flatnonzero(np.diff(days["day"]) > time.max_gap_days)
        after = total - future - np.cumsum(days["n"])[gaps]  # rows after each gap
        ok = gaps[after <= time.max_tail_share * total]
        if len(ok):
            first = int(ok[0]) + 1  # the earliest such gap drops the most
            cut = int(days["day"][first]) * engine.NS_PER_DAY
            tail = total - future - int(np.cumsum(days["n"])[first - 1])
    counts = {TIMESTAMP_AFTER_CLOCK: future, TIMESTAMP_ISOLATED_TAIL: tail}
    if not future and not tail:
        return table, counts
    example = con.execute(
        f"SELECT user_id, item_id, ts, row FROM {table} WHERE ts >= ? ORDER BY ts DESC, row LIMIT 1",
        [min(cut, now_ns + 1)],
    ).fetchall()[0]
    when = pd.Timestamp(example[2])
    detail = (
        f"{future} row(s) dated after this run's clock and {tail} isolated row(s) after a gap of more than "
        f"{time.max_gap_days} days (latest: row {example[3] + 1}, user {example[0]!r}, item {example[1]!r}, {when})"
    )
    if time.outliers == "error":
        raise DataError(
            f"{name}: implausible timestamps: {detail}; fix the source or set data.time.outliers=skip"
        )
    log.warning("%s: skipped %s", name, detail)
    out = _next(table)
    con.execute(
        f"CREATE TABLE {out} AS SELECT * FROM {table} WHERE ts < ? ORDER BY row", [min(cut, now_ns + 1)]
    )
    return out, counts


def apply_filters(
    con: duckdb.DuckDBPyConnection, table: str, min_user: int, min_item: int, kcore: bool
) -> tuple[str, int]:
    """Drop users/items with too few interactions (once, or iterated to a k-core)."""
    before = engine.count(con, table)
    n = before
    start = table  # the caller's table stays; intermediate ones are dropped
    while min_user > 0 or min_item > 0:
        out = _next(table)
        con.execute(
            f"""CREATE TABLE {out} AS SELECT * FROM {table}
            WHERE user_id IN (SELECT user_id FROM {table} GROUP BY user_id HAVING count(*) >= {int(min_user)})
              AND item_id IN (SELECT item_id FROM {table} GROUP BY item_id HAVING count(*) >= {int(min_item)})
            ORDER BY row"""
        )
        kept = engine.count(con, out)
        if table != start:
            con.execute(f"DROP TABLE {table}")
        table = out
        if kept == n or not kcore:
            break
        n = kept
    return table, before - engine.count(con, table)


def split_labels_sql(
    con: duckdb.DuckDBPyConnection, table: str, split: SplitSettings
) -> tuple[str, dict[str, Any]]:
    """The SQL expression of the split code (0 train, 1 val, 2 test) over ``table`` (``user_idx``, ``ts``, ``row``).

    * ``temporal``: global cut dates. ``test_start = last day - test_days`` and
      ``val_start = test_start - val_days`` (or given explicitly). Train is strictly before
      ``val_start``, so nothing in training is after the cut.
    * ``leave_one_out``: per user, the last interaction is test and the second last validation;
      users with fewer than 3 interactions stay in training only.
    """
    method = split.method
    info: dict[str, Any] = {"method": method}
    if method == "temporal":
        last_day = pd.Timestamp(engine.scalar(con, f"SELECT max(ts) FROM {table}")).normalize()
        test_start = pd.Timestamp(split.test_start or last_day - pd.Timedelta(days=split.test_days))
        val_start = pd.Timestamp(split.val_start or test_start - pd.Timedelta(days=split.val_days))
        info.update(
            val_start=str(val_start.date()),
            test_start=str(test_start.date()),
            test_days=split.test_days,
            val_days=split.val_days,
        )
        return (
            f"CASE WHEN ts >= {test_start.value} THEN 2 WHEN ts >= {val_start.value} THEN 1 ELSE 0 END",
            info,
        )
    if method == "leave_one_out":
        info["users_too_short"] = int(
            engine.scalar(
                con,
                f"SELECT count(*) FROM (SELECT user_idx FROM {table} GROUP BY user_idx HAVING count(*) < 3)",
            )
        )
        from_end = "row_number() OVER (PARTITION BY user_idx ORDER BY ts DESC, row DESC) - 1"
        size = "count(*) OVER (PARTITION BY user_idx)"
        return (
            f"CASE WHEN {size} < 3 THEN 0 WHEN {from_end} = 0 THEN 2 WHEN {from_end} = 1 THEN 1 ELSE 0 END",
            info,
        )
    raise DataError(f"data.split.method: unknown split method '{method}' (temporal | leave_one_out)")


def fold_split(
    settings: PrepareSettings, con: duckdb.DuckDBPyConnection, table: str
) -> tuple[SplitSettings, dict[str, Any]]:
    """The split one processed folder is built with, and what the manifest records of its fold.

    A ``temporal`` or ``leave_one_out`` split is returned as it is (and ``{}``). A ``rolling`` split's
    fold becomes a temporal split with explicit cut dates (:func:`~towerrec.data.settings.rolling_cuts`),
    anchored on the last day of the whole (filtered) data, as the one-window temporal split is: fold
    K-1 of K is that split. Its ``test_end`` drops every later interaction (:func:`drop_after_end`).
    """
    split = settings.split
    if split.method != "rolling":
        return split, {}
    if split.fold is None:
        raise DataError(
            "data.split.fold: a rolling split is prepared one fold at a time; towerrec-prepare, towerrec-train, "
            "towerrec-eval and towerrec-reproduce run every fold (towerrec.backtest)"
        )
    f = settings.filter
    full, _ = apply_filters(con, table, f.min_user_interactions, f.min_item_interactions, f.kcore)
    if engine.count(con, full) == 0:
        raise DataError(f"{settings.root}: no interactions left after validation and filtering")
    last_day = pd.Timestamp(engine.scalar(con, f"SELECT max(ts) FROM {full}")).normalize()
    cuts = rolling_cuts(split, last_day)[split.fold]
    n_train = engine.scalar(con, f"SELECT count(*) FROM {full} WHERE ts < ?", [cuts["val_start"].value])
    if full != table:
        con.execute(f"DROP TABLE {full}")
    if not n_train:
        raise DataError(
            f"data.split.folds: fold {split.fold} of {split.folds} has no training interactions before its validation "
            f"window (from {cuts['val_start'].date()}): use fewer folds or shorter windows"
        )
    val_days = split.val_days or split.window
    temporal = SplitSettings(
        method="temporal",
        test_days=split.window,
        val_days=val_days,
        test_start=str(cuts["test_start"].date()),
        val_start=str(cuts["val_start"].date()),
        test_end=None if cuts["test_end"] is None else str(cuts["test_end"].date()),
    )
    info = {
        "fold": split.fold,
        "folds": split.folds,
        "window_days": split.window,
        "last_day": str(last_day.date()),
    }
    return temporal, info


def drop_after_end(con: duckdb.DuckDBPyConnection, table: str, split: SplitSettings) -> tuple[str, int]:
    """The interactions before ``split.test_end`` (all without one) and how many were dropped.

    The rows are dropped before filtering, id mapping and every count, so nothing after a fold's test
    window reaches its processed folder: not training, histories, seen items nor popularity.
    """
    if split.test_end is None:
        return table, 0
    out = _next(table)
    con.execute(
        f"CREATE TABLE {out} AS SELECT * FROM {table} WHERE ts < ? ORDER BY row",
        [pd.Timestamp(split.test_end).value],
    )
    return out, engine.count(con, table) - engine.count(con, out)


def _next(table: str) -> str:
    """A new table name after ``table`` (``inter`` -> ``inter_1`` -> ``inter_2``)."""
    base, _, n = table.rpartition("_")
    return f"{base}_{int(n) + 1}" if n.isdigit() and base else f"{table}_1"


# ----------------------------------------------------------------------------- features
def hash_tokens(texts: pd.Series, buckets: int, max_tokens: int) -> np.ndarray:
    """Hashing tokenizer: lower-case alphanumeric words -> crc32 % buckets + 1; 0 pads."""
    out = np.zeros((len(texts) + 1, max_tokens), dtype=np.int64)
    for row, text in enumerate(texts.fillna("").astype(str), start=1):
        toks = _TOKEN.findall(text.lower())[:max_tokens]
        if toks:
            out[row, : len(toks)] = [zlib.crc32(t.encode()) % buckets + 1 for t in toks]
    return out


def encode_categoricals(items: pd.DataFrame, fields: list[str]) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Integer codes per field (1.., sorted vocabulary); empty or missing -> 0 (unknown)."""
    codes = np.zeros((len(items) + 1, len(fields)), dtype=np.int64)
    vocab: dict[str, list[str]] = {}
    for j, f in enumerate(fields):
        col = items[f].astype("string").fillna("").str.strip()
        values = sorted(v for v in col.unique() if v != "")
        cat = pd.Categorical(col.where(col != "", None), categories=values)
        codes[1:, j] = np.asarray(cat.codes, dtype=np.int64) + 1  # -1 (missing) -> 0
        vocab[f] = values
    return codes, vocab


def customer_segments(
    activity: pd.DataFrame, n_users: int, train_end: pd.Timestamp, new_days: int, active_days: int
) -> pd.DataFrame:
    """RFM quantile scores (1 = low .. 3 = high) and lifecycle stage from training data only.

    Recency is days from the last training purchase to the end of training (a high R score means
    recent), frequency the number of distinct purchase days, monetary the summed spend (price x
    quantity, or the purchase count without prices). Lifecycle: ``new`` (first purchase within
    ``new_days`` of the end of training), ``active`` (last purchase within ``active_days``),
    ``lapsing`` (older), ``no_history`` (no training purchase).

    Args:
        activity: :func:`user_activity`, one row per user with a training purchase (``first``,
            ``last``, ``frequency``, ``monetary``), indexed by ``user_idx`` in increasing order.
    """
    idx = np.arange(1, n_users + 1)
    if len(activity) == 0:
        seg = pd.DataFrame(index=pd.Index(idx, name="user_idx"))
        seg["lifecycle"] = "no_history"
        return seg.reset_index()
    # Per-user arrays filled by position (user_idx - 1), not a frame joined to all users: at 5M
    # customers the join and its fills held several copies of every column. The values and dtypes are
    # the join's: users without a training purchase get NaN (so an integer column becomes float, as a
    # join makes it), rfm 0 and lifecycle ``no_history``.
    at = activity.index.to_numpy() - 1
    everyone = len(at) == n_users

    def spread(values: np.ndarray, missing: float | int) -> np.ndarray:
        if everyone:
            return values
        out = np.full(n_users, missing, dtype=np.result_type(values.dtype, missing))
        out[at] = values
        return out

    def q3(x: pd.Series, ascending: bool) -> np.ndarray:
        if len(x) < 3:
            return np.full(len(x), 2, dtype=np.int8)
        r = x.rank(method="first", ascending=ascending)
        return (pd.qcut(r, 3, labels=False).astype(np.int8) + 1).to_numpy()

    recency_days = (train_end - activity["last"]).dt.total_seconds() / 86400.0
    days_since_first = (train_end - activity["first"]).dt.total_seconds() / 86400.0
    # Scores and codes in one byte each (5M customers: 5 MB a column, not 40); users.parquet stores
    # the scores as BIGINT (see _write_users).
    rfm = {
        "rfm_r": spread(q3(recency_days, ascending=False), 0),
        "rfm_f": spread(q3(activity["frequency"], ascending=True), 0),
        "rfm_m": spread(q3(activity["monetary"], ascending=True), 0),
    }
    stage = np.where(days_since_first <= new_days, 0, np.where(recency_days <= active_days, 1, 2)).astype(np.int8)
    del days_since_first
    code = np.where(rfm["rfm_r"] > 0, (rfm["rfm_r"] - 1) * 9 + (rfm["rfm_f"] - 1) * 3 + rfm["rfm_m"], 0)
    return pd.DataFrame(
        {
            "user_idx": idx,
            "recency_days": spread(recency_days.to_numpy(), np.nan),
            "frequency": spread(activity["frequency"].to_numpy(), np.nan),
            "monetary": spread(activity["monetary"].to_numpy(), np.nan),
            **rfm,
            # Categoricals: a few bytes per customer, not a string each (millions of customers).
            "lifecycle": pd.Categorical.from_codes(spread(stage, LIFECYCLE.index("no_history")), LIFECYCLE),
            "rfm_segment": pd.Categorical.from_codes(code, RFM_SEGMENTS),
        },
        copy=False,  # one block per column: consolidating them copied every column while the inputs lived
    )


# ----------------------------------------------------------------------------- main
def prepare(data: PrepareSettings | DictConfig, force: bool = False, workers: int = 2) -> Path:
    """Build the processed folder unless its manifest shows it is complete and up to date.

    Safe to call from many processes at once: exactly one builds, the others wait for it and use
    the result. With ``force`` a process rebuilds unless another one finished a build while it waited.

    Args:
        data: typed settings (:meth:`PrepareSettings.from_config`), or the ``data`` config to build
            them from.
        force: rebuild even when the folder is up to date.
        workers: processes decoding images.

    Returns:
        The processed folder.
    """
    settings = _settings(data)
    out = settings.processed_dir
    seen = _build_id(out)
    if not force and is_up_to_date(settings):
        log.info("%s is up to date (manifest matches config and inputs): nothing to do", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(lock_path(out))
    _acquire(lock, out)
    try:
        if is_up_to_date(settings) and (not force or _build_id(out) != seen):
            log.info("%s was prepared by another process while this one waited: using it", out)
            return out
        _remove_leftovers(out)
        _build(settings, workers)
    finally:
        lock.release()
    return out


def ensure_prepared(data: PrepareSettings | DictConfig, workers: int = 2) -> Path:
    """Prepare the data when its processed folder is missing, incomplete or stale; return the folder."""
    return prepare(data, force=False, workers=workers)


def _build(settings: PrepareSettings, workers: int) -> None:
    """Build the processed folder in a temporary folder of this process and rename it into place."""
    t0 = time.perf_counter()
    now_ns = time.time_ns()
    out = settings.processed_dir
    with engine.connect(settings.engine, engine.scratch_folder(out, settings.engine)) as con:
        inputs = tree_fingerprint(settings.root)
        with engine.memory_lowered(con, engine.LOAD_LIMIT, settings.engine):
            raw = _load(settings, con)
        table = _interactions_table(con, raw)
        if list(raw.users.columns) == ["user_id"]:
            # Ids without attributes: the user map built from the interactions has them all.
            raw.users = raw.users.iloc[:0]

        def step(result: tuple[str, Any]) -> Any:
            """Keep the step's table, drop the one it replaces (they are as large as the data)."""
            nonlocal table
            if result[0] != table:
                con.execute(f"DROP TABLE {table}")
                table = result[0]
            return result[1]

        raw.skipped.update(step(time_outliers(con, table, settings.time, now_ns, _interactions_name(raw))))
        split, fold_info = fold_split(settings, con, table)
        n_dropped = step(drop_after_end(con, table, split))
        f = settings.filter
        n_filtered = step(
            apply_filters(con, table, f.min_user_interactions, f.min_item_interactions, f.kcore)
        )
        if engine.count(con, table) == 0:
            raise DataError(f"{settings.root}: no interactions left after validation and filtering")
        items, images = _catalog(raw, con, table)
        raw.images = None  # reordered into ``images``: one copy, not two (150 MB at 200k items of 16 px)
        _map_ids(con, table, items)
        con.execute(f"DROP TABLE {table}")
        split_sql, split_info = split_labels_sql(con, "mapped", split)
        con.execute(f"CREATE TABLE labelled AS SELECT *, ({split_sql})::TINYINT AS split FROM mapped")
        con.execute("DROP TABLE mapped")
        if split.test_end is not None:
            split_info.update(test_end=split.test_end, dropped_after_end=n_dropped)
        split_counts = dict(con.execute("SELECT split, count(*) FROM labelled GROUP BY split").fetchall())
        if fold_info:
            split_info["rolling"] = fold_info
            for name, code in (("val", 1), ("test", 2)):
                if not split_counts.get(code):
                    raise DataError(
                        f"data.split.folds: fold {fold_info['fold']} of {fold_info['folds']} has no {name} interactions "
                        f"({name} window from {split_info[name + '_start']}): use fewer folds or longer windows"
                    )
        with atomic_folder(out) as tmp:
            _write_interactions(con, tmp / "interactions.parquet")
            with engine.memory_lowered(con, engine.RELEASED_LIMIT, settings.engine):  # numpy and pandas only
                sequences = write_sequences(tmp / "interactions.parquet", tmp)
                features = _item_files(tmp, items, raw, images, settings, workers)
            images = None  # written to images.npy: not held through the users step (150 MB at 200k items)
            n_users = _write_users(con, raw, tmp / "users.parquet", split_info, settings)
            manifest = {
                "towerrec_prepare_version": PREPARE_VERSION,
                "name": settings.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build": {"id": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname()},
                "config_hash": settings.config_hash,
                "config": settings.config,
                "inputs": inputs,
                "sources": raw.sources,
                "counts": _counts(con, split_counts, items, n_users),
                "split": split_info,
                "sequences": sequences,
                "skipped": dict(raw.skipped),
                "repaired": dict(raw.repaired),
                "filtered": {"min_interactions": int(n_filtered)},
                **features,
                "engine": {"duckdb": duckdb.__version__, "memory_limit": settings.engine.memory_limit},
                "seconds": round(time.perf_counter() - t0, 2),
            }
            manifest["files"] = folder_files(tmp)  # last: it lists every file written above
            write_json(tmp / MANIFEST, manifest)
    log.info("prepared %s in %.1f s: %s", out, manifest["seconds"], manifest["counts"])


def _load(settings: PrepareSettings, con: duckdb.DuckDBPyConnection) -> RawDataset:
    """Call the source; one that takes ``con`` gets the engine (and may return an engine table)."""
    load = settings.load
    target = getattr(load, "func", load)
    try:
        takes_con = "con" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        takes_con = False
    return load(con=con) if takes_con else load()


def _interactions_name(raw: RawDataset) -> str:
    """The interactions input's file name, for messages."""
    for path in raw.sources:
        if Path(path).suffix in (".csv", ".tsv", ".parquet", ".pq", ".dat", ".data", ".txt"):
            return Path(path).name
    return "interactions"


def _interactions_table(con: duckdb.DuckDBPyConnection, raw: RawDataset) -> str:
    """The source's interactions as the engine table ``inter`` (a pandas frame is copied in once)."""
    if isinstance(raw.interactions, str):
        if raw.interactions != "inter":
            con.execute(f"CREATE TABLE inter AS SELECT * FROM {raw.interactions} ORDER BY row")
        return "inter"
    engine.frame_to_table(con, raw.interactions, "inter")
    raw.interactions = "inter"  # the frame is not needed again: let it go
    return "inter"


def _catalog(
    raw: RawDataset, con: duckdb.DuckDBPyConnection, table: str
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The item table in sorted raw-id order with ``item_idx`` from 1, and the images in that order."""
    items = raw.items.reset_index(drop=True)
    con.register("_catalog_ids", pd.DataFrame({"item_id": items["item_id"].astype(str)}))
    try:
        extra = con.execute(
            f"SELECT DISTINCT item_id FROM {table} WHERE item_id NOT IN (SELECT item_id FROM _catalog_ids) ORDER BY item_id"
        ).df()
    finally:
        con.unregister("_catalog_ids")
    if len(extra):  # sources add interacted items to the catalog; this guards custom ones
        items = pd.concat([items, extra], ignore_index=True)
    item_order = np.argsort(items["item_id"].to_numpy(dtype=str), kind="stable")
    items = items.iloc[item_order].reset_index(drop=True)
    images = raw.images[item_order] if raw.images is not None else None
    items.insert(0, "item_idx", np.arange(1, len(items) + 1, dtype=np.int64))
    return items, images


def _map_ids(con: duckdb.DuckDBPyConnection, table: str, items: pd.DataFrame) -> None:
    """Create the engine tables ``user_map`` (user id -> ``user_idx``) and ``mapped`` (integer ids).

    Users are numbered from 1 in sorted id order (byte order of UTF-8, which is code point order, as
    Python sorts strings); items take ``item_idx`` from the catalog.
    """
    con.execute(
        f"CREATE TABLE user_map AS SELECT user_id, row_number() OVER (ORDER BY user_id) AS user_idx "
        f"FROM (SELECT DISTINCT user_id FROM {table})"
    )
    con.register("_item_map", items[["item_id", "item_idx"]].astype({"item_id": str}))
    try:
        con.execute("CREATE TABLE item_map AS SELECT item_id, item_idx::BIGINT AS item_idx FROM _item_map")
    finally:
        con.unregister("_item_map")
    extra = [c for c in engine.OPTIONAL if c in engine.columns(con, table)]
    cols = "".join(f", t.{c}" for c in extra)
    con.execute(
        f"CREATE TABLE mapped AS SELECT u.user_idx::BIGINT AS user_idx, m.item_idx, t.ts{cols}, t.row "
        f"FROM {table} t JOIN user_map u USING (user_id) JOIN item_map m USING (item_id)"
    )


def _write_interactions(con: duckdb.DuckDBPyConnection, path: Path, batch_rows: int = 1 << 20) -> None:
    """Stream ``labelled`` sorted by user, then time, then source row into ``interactions.parquet``.

    The sort spills to disk inside DuckDB; the file is written a batch at a time with the column
    types pandas wrote before (int64 ids, ``timestamp[ns]``, ``split`` a train/val/test dictionary).
    """
    extra = [c for c in engine.OPTIONAL if c in engine.columns(con, "labelled")]
    names = ["user_idx", "item_idx", "timestamp", *extra, "split"]
    select = ", ".join(["user_idx", "item_idx", "ts", *extra, "split"])
    reader = con.sql(f"SELECT {select} FROM labelled ORDER BY user_idx, ts, row").to_arrow_reader(batch_rows)
    labels = pa.array(list(SPLITS), type=pa.string())
    writer = None
    try:
        for batch in reader:
            cols = [batch.column(i) for i in range(batch.num_columns)]
            cols[2] = cols[2].cast(pa.int64()).view(pa.timestamp("ns"))
            cols[-1] = pa.DictionaryArray.from_arrays(cols[-1].cast(pa.int8()), labels)
            out = pa.RecordBatch.from_arrays(cols, names=names)
            if writer is None:
                writer = pq.ParquetWriter(path, out.schema)
            writer.write_batch(out)
        if writer is None:  # no rows: still a file with the columns
            empty = pa.RecordBatch.from_arrays(
                [pa.array([], pa.int64()), pa.array([], pa.int64()), pa.array([], pa.timestamp("ns"))]
                + [pa.array([]) for _ in extra]
                + [pa.DictionaryArray.from_arrays(pa.array([], pa.int8()), labels)],
                names=names,
            )
            writer = pq.ParquetWriter(path, empty.schema)
    finally:
        if writer is not None:
            writer.close()


def _item_files(
    tmp: Path, items: pd.DataFrame, raw: RawDataset, images: np.ndarray | None, settings: PrepareSettings, workers: int
) -> dict[str, Any]:
    """Write ``items.parquet`` (with training counts), the categorical, text and image arrays and the
    vocabularies; return the manifest's ``images`` and ``features`` entries.

    The training counts come from the sequence files in ``tmp``, a few users at a time (DuckDB's
    ``count(DISTINCT ...)`` per item took the 100M prepare's peak RSS to 2.1 GB).
    """
    train_count, train_users = train_item_counts(load_sequences(tmp), len(items))
    items["train_count"] = train_count[1:]
    items["train_users"] = train_users[1:]
    items["is_cold"] = items["train_count"].to_numpy() == 0
    cats, vocab = encode_categoricals(items, raw.categorical)
    np.save(tmp / "item_categorical.npy", cats)
    cols = [items[c].fillna("").astype(str).tolist() for c in raw.text]
    text = pd.Series([" ".join(parts) for parts in zip(*cols, strict=True)] if cols else [""] * len(items))
    np.save(tmp / "item_text.npy", hash_tokens(text, settings.text.buckets, settings.text.max_tokens))

    paths = items["image_path"].tolist() if "image_path" in items else [None] * len(items)
    has_image, image_counts = build_image_cache(
        paths, tmp / "images.npy", settings.image_size, workers, images
    )
    items["has_image"] = has_image[1:]
    items.to_parquet(tmp / "items.parquet", index=False)
    write_json(tmp / "vocab.json", vocab, indent=None)
    return {
        "images": {"size": settings.image_size, **dict(image_counts)},
        "features": {
            "categorical": {f: len(v) + 1 for f, v in vocab.items()},
            "text_buckets": settings.text.buckets + 1,
            "text_max_tokens": settings.text.max_tokens,
        },
    }


def user_activity(con: duckdb.DuckDBPyConnection, table: str = "labelled") -> pd.DataFrame:
    """Per user with a training interaction: ``n_train``, first and last purchase, frequency, monetary.

    Frequency is the number of distinct purchase days, monetary the summed spend (price x quantity, or
    the purchase count without prices), indexed by ``user_idx`` in increasing order.
    """
    have = engine.columns(con, table)
    if "price" in have:
        spend = "price * quantity" if "quantity" in have else "price"
    else:
        spend = "1.0"
    frame = con.execute(
        f"""SELECT user_idx, count(*) AS n_train, min(ts) AS first, max(ts) AS last,
               count(DISTINCT {engine.day_sql()}) AS frequency, fsum({spend}) AS monetary
            FROM {table} WHERE split = 0 GROUP BY user_idx ORDER BY user_idx"""
    ).df()
    for c in ("first", "last"):  # nanosecond integers viewed as times, without copies (5M users at 100M rows)
        frame[c] = frame[c].to_numpy(dtype=np.int64).view("datetime64[ns]")
    return frame.set_index("user_idx")


_USERS_PER_PART = 1 << 20


def _write_users(
    con: duckdb.DuckDBPyConnection, raw: RawDataset, path: Path, split_info: dict, settings: PrepareSettings
) -> int:
    """Write ``users.parquet``: one row per user, the source's attributes, training count and segments.

    The table is joined in the engine and streamed out; pandas holds only the numeric per-user
    aggregates and the segment codes. Returns the number of users.
    """
    n_users = engine.count(con, "user_map")
    activity = user_activity(con)
    temporal = split_info["method"] == "temporal"
    train_end = pd.Timestamp(split_info["val_start"]) if temporal else activity["last"].max()
    with engine.memory_lowered(con, engine.RELEASED_LIMIT, settings.engine):  # pandas, per user
        segs = customer_segments(
            activity, n_users, train_end, settings.segments.new_days, settings.segments.active_days
        )
        n_train = np.zeros(n_users + 1, dtype=np.int64)
        n_train[activity.index.to_numpy()] = activity["n_train"].to_numpy()
        del activity
        segs.insert(1, "n_train", n_train[1:])  # segs holds users 1..n in order
    attrs = [c for c in raw.users.columns if c != "user_id"] if "user_id" in raw.users else []
    if attrs:  # the source's attributes (first row per user), joined by raw id
        con.register("_attrs", raw.users.drop_duplicates("user_id"))
    writer = None
    try:
        cols = "".join(f', a."{c}"' for c in attrs)
        join = "LEFT JOIN _attrs a USING (user_id)" if attrs else ""
        seg_cols = [c for c in segs.columns if c not in ("user_idx", "lifecycle", "rfm_segment")]
        select = (
            f"SELECT m.user_idx::BIGINT AS user_idx, m.user_id{cols}, "
            + ", ".join(f"s.{c}::BIGINT AS {c}" if c.startswith("rfm_") else f"s.{c}" for c in seg_cols)
            + ", s.lifecycle::VARCHAR AS lifecycle, s.rfm_segment::VARCHAR AS rfm_segment "
            f"FROM user_map m {join} JOIN _segs s USING (user_idx) "
        )
        # A part of the users at a time (``segs`` holds users 1..n in order): one join and sort of
        # all 5M users took the 100M prepare's peak RSS to 2.0 GB.
        for lo in range(1, max(n_users, 1) + 1, _USERS_PER_PART):
            hi = min(lo + _USERS_PER_PART - 1, n_users)
            con.register("_segs", segs.iloc[lo - 1 : hi])
            part = con.sql(select + f"WHERE m.user_idx BETWEEN {lo} AND {hi} ORDER BY m.user_idx")
            if writer is None:
                writer = pq.ParquetWriter(path, part.limit(0).to_arrow_table().schema)
            for batch in part.to_arrow_reader(1 << 20):
                writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()
        con.unregister("_segs")
        if attrs:
            con.unregister("_attrs")
    return n_users


def _counts(
    con: duckdb.DuckDBPyConnection, split_counts: dict[int, int], items: pd.DataFrame, n_users: int
) -> dict[str, int]:
    """The manifest's counts: users, items, interactions per split, cold and image-less items."""
    cold = dict(
        con.execute(
            "SELECT split, count(*) FROM labelled JOIN (SELECT item_idx FROM labelled WHERE split = 0 GROUP BY item_idx) w "
            "USING (item_idx) GROUP BY split"
        ).fetchall()
    )
    interacted = int(engine.scalar(con, "SELECT count(DISTINCT item_idx) FROM labelled"))
    per_split = {name: int(split_counts.get(code, 0)) for code, name in enumerate(SPLITS)}
    return {
        "users": n_users,
        "items": len(items),
        "interactions": sum(per_split.values()),
        **per_split,
        "cold_items": int(items["is_cold"].sum()),
        "items_never_interacted": len(items) - interacted,
        "items_with_image": int(items["has_image"].sum()),
        "val_cold_interactions": per_split["val"] - int(cold.get(1, 0)),
        "test_cold_interactions": per_split["test"] - int(cold.get(2, 0)),
    }
