"""Any interactions table (CSV, TSV or parquet), plus an optional items table, with a column mapping."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import duckdb
import pandas as pd

from towerrec.data.schema import INTERACTION_COLUMNS, INTERACTION_OPTIONAL, DataError, RawDataset
from towerrec.data.sources.readers import (
    CHUNK_ROWS,
    build_items,
    canonical_interactions,
    engine_interactions,
    engine_result,
    ordered_union,
    read_table,
    scan_images,
    source_engine,
    table_chunks,
)
from towerrec.data.validate import (
    dedupe_keyed,
    drop_duplicate_rows,
    drop_invalid_prices,
    drop_unknown_items,
    require_columns,
    require_ids,
    to_id_str,
)
from towerrec.fileio import file_fingerprint, tree_fingerprint

log = logging.getLogger(__name__)


def load_table(
    root: str,
    interactions: str,
    items: str | None = None,
    columns: dict | None = None,
    item_columns: dict | None = None,
    categorical: Sequence[str] = (),
    text: Sequence[str] = (),
    timestamp_format: str | None = None,
    image_dir: str | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> RawDataset:
    """Load interactions (and optionally an item table) from CSV, TSV or parquet files.

    Numeric timestamps are unix seconds; strings are parsed with ``timestamp_format`` or an inferred
    format. With an items file the catalog is that file, and interactions with other items are
    counted skips (``unknown_item``); without one the catalog is the interacted items. Exact
    duplicate interaction rows are counted skips (``duplicate_row``).

    Args:
        root: folder the file names are relative to.
        interactions: interactions file name.
        items: item table file name.
        columns: canonical name -> source column for interactions, e.g. ``{"user_id": "customer",
            "item_id": "sku", "timestamp": "ts", "price": "amount"}``. Unmapped canonical columns are
            looked up by their own name; ``price``, ``quantity`` and ``channel`` are optional, and
            any other mapped name (e.g. ``rating``) is kept as an extra column.
        item_columns: canonical name -> source column for the items file: ``item_id``, ``image``
            (image file, relative to ``image_dir`` or ``root``) and the categorical and text fields.
        categorical: canonical names of the categorical item fields.
        text: canonical names of the free-text item fields.
        timestamp_format: strptime format of string timestamps.
        image_dir: image folder (relative to ``root`` unless absolute); without an ``image``
            column, images are looked up as ``<image_dir>/<item_id>.jpg``.
        con: a preparing build's DuckDB connection: the interactions are validated ``chunk_rows`` at a
            time into its engine, where repeats and unknown items are dropped, and returned as an
            engine table's name (without one, as a pandas frame).
    """
    root_path = Path(root).resolve()
    skipped: Counter = Counter()
    columns = dict(columns or {})
    item_columns = dict(item_columns or {})
    categorical, text = list(categorical), list(text)

    inter_path = root_path / interactions
    name = inter_path.name
    convert = _converter(columns, name, timestamp_format, skipped)
    image_root = root_path / image_dir if image_dir is not None else root_path
    sources: dict = {}
    fields = categorical + text
    with source_engine(con) as db:
        engine_interactions(db, table_chunks(inter_path, chunk_rows), convert, "table_tx")
        table = drop_duplicate_rows(db, "table_tx", skipped, name)
        sources[str(inter_path)] = file_fingerprint(inter_path)  # after reading: a bad file's error comes first
        items_path = root_path / items if items is not None else None
        table, ids, meta = _catalog(db, table, items_path, item_columns, fields, skipped, name)
        if items_path is not None:
            sources[str(items_path)] = file_fingerprint(items_path)
        interactions = engine_result(db, table, con)

    if meta is not None and "image" in meta:
        images = _image_paths(meta, image_root, items)
    else:
        images = scan_images(image_root) if image_dir is not None else {}
    if image_dir is not None and image_root.is_dir():
        sources[str(image_root)] = tree_fingerprint(image_root, "*")

    return RawDataset(
        interactions=interactions,
        items=build_items(ids, meta, fields, images),
        categorical=categorical,
        text=text,
        skipped=skipped,
        sources=sources,
    )


def _converter(columns: dict, name: str, timestamp_format: str | None, skipped: Counter):
    """The function that turns one chunk of the interactions file into canonical interactions."""

    def convert(raw: pd.DataFrame) -> pd.DataFrame:
        mapping = {c: columns.get(c, c) for c in INTERACTION_COLUMNS}
        for c in INTERACTION_OPTIONAL:
            if c in columns or c in raw.columns:
                mapping[c] = columns.get(c, c)
        mapping.update({c: s for c, s in columns.items() if c not in mapping})
        df = canonical_interactions(raw, name, mapping, timestamp_format)
        return drop_invalid_prices(df, skipped, name)[0] if "price" in df else df

    return convert


def _catalog(
    db: duckdb.DuckDBPyConnection,
    table: str,
    items_path: Path | None,
    item_columns: dict,
    fields: list[str],
    skipped: Counter,
    name: str,
) -> tuple[str, pd.Index, pd.DataFrame | None]:
    """The catalog: the items file (interactions with other items dropped as ``unknown_item``), else the
    interacted items in order of first interaction.

    Returns:
        The interactions table, the item ids and the items file's rows (None without one).
    """
    if items_path is None:
        if fields:
            raise DataError(f"{name}: categorical/text item fields {fields} need an items file")
        first_seen = db.execute(f"SELECT item_id FROM {table} GROUP BY item_id ORDER BY min(row)").fetchall()
        return table, ordered_union([r[0] for r in first_seen]), None
    meta = _read_items(items_path, item_columns, fields, skipped)
    table = drop_unknown_items(db, table, meta["item_id"], skipped, name)
    return table, pd.Index(meta["item_id"], dtype=object), meta


def _read_items(path: Path, item_columns: dict, fields: list[str], skipped: Counter) -> pd.DataFrame:
    """The items file as canonical columns (``item_id``, the fields, optional ``image``), one row per id."""
    meta = read_table(path)
    source_of = {c: item_columns.get(c, c) for c in ["item_id", *fields]}
    if "image" in item_columns:
        source_of["image"] = item_columns["image"]
    require_columns(meta, list(source_of.values()), path.name)
    meta = meta.assign(**{source_of["item_id"]: to_id_str(meta[source_of["item_id"]])})
    require_ids(meta, [source_of["item_id"]], path.name)
    meta = pd.DataFrame({c: meta[s] for c, s in source_of.items()}, index=meta.index)
    return dedupe_keyed(meta, "item_id", path.name, skipped, "duplicate_item_row")


def _image_paths(meta: pd.DataFrame, image_root: Path, items_file: str) -> dict[str, str]:
    """item_id -> absolute image path from the items file's ``image`` column (relative to ``image_root``)."""
    images = {}
    for item_id, name in zip(meta["item_id"], meta["image"], strict=True):
        if isinstance(name, str) and name.strip():
            # Kept even when the file is missing: the image cache counts it as missing_file.
            images[item_id] = str((image_root / name).resolve())
    found = sum(Path(p).is_file() for p in images.values())
    log.info("%s: %d of %d item image file(s) found", items_file, found, len(meta))
    return images
