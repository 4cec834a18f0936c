"""The H&M Personalized Fashion Recommendations files: transactions, articles, customers, images.

The H&M column names live here and only here; the rest of the pipeline sees canonical columns.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import duckdb
import pandas as pd

from towerrec.data import engine
from towerrec.data.schema import RawDataset
from towerrec.data.sources.readers import (
    CHUNK_ROWS,
    build_items,
    canonical_interactions,
    engine_interactions,
    engine_result,
    ordered_union,
    scan_images,
    source_engine,
)
from towerrec.data.validate import (
    dedupe_keyed,
    drop_invalid_prices,
    read_csv_chunks,
    read_csv_utf8,
    require_columns,
    require_ids,
)
from towerrec.fileio import file_fingerprint, tree_fingerprint

log = logging.getLogger(__name__)

HM_CATEGORICAL = [
    "product_code",  # groups the colour variants of one product; derived from article_id where absent
    "product_type_name",
    "product_group_name",
    "graphical_appearance_name",
    "colour_group_name",
    "perceived_colour_value_name",
    "perceived_colour_master_name",
    "department_name",
    "index_name",
    "index_group_name",
    "section_name",
    "garment_group_name",
]
# Derived from product_code: its leading digits, a coarse release cohort (codes are issued over time).
HM_DERIVED = ["product_code_block"]
HM_TEXT = ["prod_name", "detail_desc"]
HM_USER_FIELDS = ["club_member_status", "fashion_news_frequency"]
SAME_DAY_MERGED = "same_day_repeat_merged"


def _merge_same_day(con: duckdb.DuckDBPyConnection, table: str, repaired: Counter, file: str) -> str:
    """Merge engine rows of one user, item and calendar day into the first one (a new engine table).

    The kept row gets ``quantity`` = number of rows and ``price`` = their mean; its position, timestamp
    and channel are the first row's.
    """
    group = f"PARTITION BY user_id, item_id, {engine.day_sql()}"
    n = int(
        engine.scalar(
            con, f"SELECT count(*) - count(DISTINCT (user_id, item_id, {engine.day_sql()})) FROM {table}"
        )
    )
    repaired[SAME_DAY_MERGED] += n
    price = ", fsum(price) OVER w / count(*) OVER w AS price" if "price" in engine.columns(con, table) else ""
    keep = ", ".join(c for c in engine.columns(con, table) if c != "price")
    con.execute(
        f"""CREATE TABLE {table}_merged AS
        SELECT {keep}{price}, count(*) OVER w AS quantity FROM {table}
        WINDOW w AS ({group})
        QUALIFY row_number() OVER ({group} ORDER BY row) = 1
        ORDER BY row"""
    )
    if n and "channel" in engine.columns(con, table):
        conflicts = int(
            engine.scalar(
                con,
                f"SELECT count(*) FROM (SELECT 1 FROM {table} GROUP BY user_id, item_id, {engine.day_sql()} "
                "HAVING count(DISTINCT channel) > 1)",
            )
        )
        if conflicts:
            log.info("%s: %d merged same-day group(s) had several channels; kept the first", file, conflicts)
    if n:
        log.info("%s: merged %d same-day repeat row(s) into a quantity (%s)", file, n, SAME_DAY_MERGED)
    return f"{table}_merged"


def load_hm(
    root: str,
    same_day_repeats: str = "merge",
    con: duckdb.DuckDBPyConnection | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> RawDataset:
    """Load the H&M sample: purchases, article metadata, customers and product images.

    The catalog is the union of ``articles.csv``, purchased articles and articles with an image file
    (``images/<first 3 digits>/<article_id>.jpg``); missing metadata becomes "". Identical rows in
    ``transactions.csv`` are units of one multi-quantity purchase (the file has no transaction id),
    so they are handled by ``same_day_repeats``, not skipped as duplicates.

    Args:
        root: folder holding ``transactions.csv``, ``articles.csv``, ``customers.csv`` and ``images/``.
        same_day_repeats: rows with the same customer, article and day: ``"merge"`` them into the
            first row (quantity = number of rows, price = mean, counted in
            ``repaired["same_day_repeat_merged"]`` as rows removed) or ``"keep"`` each (quantity 1).
        con: a preparing build's DuckDB connection: the purchases are validated ``chunk_rows`` at a
            time into its engine, merged there, and returned as an engine table's name (without
            one, as a pandas frame).
    """
    if same_day_repeats not in ("merge", "keep"):
        raise ValueError(f"same_day_repeats must be 'merge' or 'keep', got {same_day_repeats!r}")
    root_path = Path(root).resolve()
    paths = {n: root_path / n for n in ("transactions.csv", "articles.csv", "customers.csv")}
    skipped: Counter = Counter()
    repaired: Counter = Counter()
    interactions, purchased, n_tx = _hm_purchases(
        paths["transactions.csv"], same_day_repeats, con, chunk_rows, skipped, repaired
    )
    items, images = _hm_items(paths["articles.csv"], root_path / "images", purchased, skipped)
    users = _hm_users(paths["customers.csv"], skipped)

    sources = {str(p): file_fingerprint(p) for p in paths.values()}
    sources[str(root_path / "images")] = tree_fingerprint(root_path / "images", "*.jpg")
    log.info(
        "H&M: %d interactions, %d items (%d with image), %d users",
        n_tx, len(items), len(images), len(users),
    )  # fmt: skip
    return RawDataset(
        interactions=interactions,
        items=items,
        users=users.reset_index(drop=True),
        categorical=[*HM_CATEGORICAL, *HM_DERIVED],
        text=list(HM_TEXT),
        skipped=skipped,
        repaired=repaired,
        sources=sources,
    )


_HM_MAPPING = {
    "user_id": "customer_id",
    "item_id": "article_id",
    "timestamp": "t_dat",
    "price": "price",
    "channel": "sales_channel_id",
}


def _hm_purchases(
    path: Path,
    same_day_repeats: str,
    con: duckdb.DuckDBPyConnection | None,
    chunk_rows: int,
    skipped: Counter,
    repaired: Counter,
) -> tuple[pd.DataFrame | str, list[str], int]:
    """``transactions.csv``, validated in chunks into the engine, same-day repeats merged or kept.

    Returns:
        The interactions (an engine table's name with ``con``, else a frame), the purchased article
        ids in order of first purchase, and the number of interactions.
    """

    def convert(raw: pd.DataFrame) -> pd.DataFrame:
        tx = canonical_interactions(raw, "transactions.csv", _HM_MAPPING, timestamp_format="%Y-%m-%d")
        return drop_invalid_prices(tx, skipped, "transactions.csv")[0]

    with source_engine(con) as db:
        engine_interactions(db, read_csv_chunks(path, chunk_rows, dtype=str), convert, "hm_tx")
        if same_day_repeats == "merge":
            table = _merge_same_day(db, "hm_tx", repaired, "transactions.csv")
        else:
            db.execute("CREATE TABLE hm_tx_kept AS SELECT *, 1::BIGINT AS quantity FROM hm_tx ORDER BY row")
            table = "hm_tx_kept"
        db.execute("DROP TABLE hm_tx")
        purchased = [
            r[0]
            for r in db.execute(f"SELECT item_id FROM {table} GROUP BY item_id ORDER BY min(row)").fetchall()
        ]
        n_tx = engine.count(db, table)
        return engine_result(db, table, con), purchased, n_tx


def _hm_items(
    path: Path, image_dir: Path, purchased: list[str], skipped: Counter
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The catalog: ``articles.csv``, purchased articles and articles with an image; and the images."""
    articles = read_csv_utf8(path, dtype=str)
    require_columns(articles, ["article_id", *HM_CATEGORICAL, *HM_TEXT], "articles.csv")
    require_ids(articles, ["article_id"], "articles.csv")
    articles = articles.rename(columns={"article_id": "item_id"})
    articles = dedupe_keyed(articles, "item_id", "articles.csv", skipped, "duplicate_item_row")

    images = scan_images(image_dir)
    known = ordered_union(articles["item_id"], purchased)
    image_only = sorted(set(images).difference(known))
    items = build_items(ordered_union(known, image_only), articles, HM_CATEGORICAL + HM_TEXT, images)
    # article_id = product code + 3-digit colour variant, so every item has its product code,
    # including the purchased articles that articles.csv does not describe.
    derived = items["item_id"].str[:-3].str.lstrip("0")
    items["product_code"] = items["product_code"].str.lstrip("0").where(items["product_code"] != "", derived)
    code = pd.to_numeric(items["product_code"], errors="coerce")
    items["product_code_block"] = (code // 10_000).astype("Int64").astype("string").fillna("").astype(str)
    # The display title (exports, the gallery): the product name, else its type; empty when undescribed.
    name, kind = (items[c].fillna("").astype(str).str.strip() for c in ("prod_name", "product_type_name"))
    items["title"] = name.where(name != "", kind)
    return items, images


def _hm_users(path: Path, skipped: Counter) -> pd.DataFrame:
    """``customers.csv``: id, numeric age (a non-numeric value read as missing) and the profile fields."""
    customers = read_csv_utf8(path, dtype=str)
    require_columns(customers, ["customer_id", "age", *HM_USER_FIELDS], "customers.csv")
    require_ids(customers, ["customer_id"], "customers.csv")
    users = pd.DataFrame({"user_id": customers["customer_id"].astype(str)})
    users["age"] = pd.to_numeric(customers["age"], errors="coerce").astype(float)
    bad_age = int((users["age"].isna() & customers["age"].notna()).sum())
    if bad_age:
        log.warning("customers.csv: %d non-numeric age value(s) read as missing", bad_age)
    for f in HM_USER_FIELDS:
        users[f] = customers[f].fillna("").astype(str)
    return dedupe_keyed(users, "user_id", "customers.csv", skipped, "duplicate_user_row")
