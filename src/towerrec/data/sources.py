"""Raw data sources: each reads its own files and returns a :class:`RawDataset`.

Every source keeps ids as strings and rows in source order (nothing is sorted), raises
:class:`DataError` on input it cannot trust and counts the rows it drops (see
:mod:`towerrec.data.validate`). The item catalog lists every item the source knows of, including
items that were never interacted with (cold-start candidates).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from towerrec.data.schema import INTERACTION_COLUMNS, INTERACTION_OPTIONAL, DataError, RawDataset
from towerrec.data.validate import (
    dedupe_keyed,
    drop_duplicate_rows,
    drop_invalid_prices,
    drop_unknown_items,
    file_fingerprint,
    parse_numbers,
    parse_timestamps,
    read_csv_utf8,
    require_columns,
    require_ids,
    to_id_str,
    tree_fingerprint,
)

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

ML_CATEGORICAL = ["genre", "genres", "year"]
ML_TEXT = ["title"]
# Order of the 19 genre flags in ML-100K's u.item (used when u.genre is absent).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]  # fmt: skip
_YEAR_IN_TITLE = r"\((\d{4})\)\s*$"


# --------------------------------------------------------------------------------------------- helpers


def _scan_images(folder: Path, suffix: str = ".jpg") -> dict[str, str]:
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


def _ordered_union(*parts: Iterable[str]) -> pd.Index:
    """Ids in order of first appearance across ``parts``."""
    uniques = [pd.Series(pd.unique(pd.Series(p, dtype=str).to_numpy()), dtype=str) for p in parts]
    values = pd.concat(uniques, ignore_index=True) if uniques else pd.Series([], dtype=str)
    return pd.Index(values.unique(), dtype=object)


def _build_items(
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


def _to_channel(series: pd.Series) -> pd.Series:
    """Integer channel codes where every value is an integer, otherwise strings ("" for missing)."""
    numbers = pd.to_numeric(series, errors="coerce")
    values = numbers.to_numpy(dtype=float, na_value=np.nan)
    if np.isfinite(values).all() and (values == np.round(values)).all():
        return numbers.astype("int64")
    return series.astype(str).where(series.notna(), "")


def _merge_same_day(df: pd.DataFrame, repaired: Counter, file: str) -> pd.DataFrame:
    """Merge rows of one user, item and calendar day into the first one.

    The kept row gets ``quantity`` = number of rows and ``price`` = their mean; its position, timestamp
    and channel are the first row's.
    """
    day = df["timestamp"].dt.floor("D")
    keys = [df["user_id"], df["item_id"], day]
    first = ~pd.DataFrame({"u": df["user_id"], "i": df["item_id"], "d": day}).duplicated().to_numpy()
    n = int((~first).sum())
    repaired[SAME_DAY_MERGED] += n
    if not n:
        return df.assign(quantity=np.ones(len(df), dtype="int64"))
    groups = df.groupby(keys, sort=False)
    out = df.assign(quantity=groups["item_id"].transform("size").astype("int64"))
    if "price" in df:
        out["price"] = groups["price"].transform("mean")
    if "channel" in df:
        conflicts = int((groups["channel"].nunique() > 1).sum())
        if conflicts:
            log.info("%s: %d merged same-day group(s) had several channels; kept the first", file, conflicts)
    log.info("%s: merged %d same-day repeat row(s) into a quantity (%s)", file, n, SAME_DAY_MERGED)
    return out[first]


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical column order, string ids, a fresh RangeIndex."""
    order = [c for c in INTERACTION_COLUMNS + INTERACTION_OPTIONAL if c in df]
    order += [c for c in df.columns if c not in order]
    df = df[order].reset_index(drop=True)
    return df.astype({"user_id": str, "item_id": str})


def _read_table(path: Path) -> pd.DataFrame:
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


def _read_lines(path: Path, sep: str, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
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


def _interactions(
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
            out["channel"] = _to_channel(raw[source])
        elif canon == "rating":
            out["rating"] = parse_numbers(raw[source], file, source)
        else:
            out[canon] = raw[source]  # price is converted (and checked) by drop_invalid_prices
    return out


# ---------------------------------------------------------------------------------------------- H&M


def load_hm(root: str, same_day_repeats: str = "merge") -> RawDataset:
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
    """
    if same_day_repeats not in ("merge", "keep"):
        raise ValueError(f"same_day_repeats must be 'merge' or 'keep', got {same_day_repeats!r}")
    root_path = Path(root).resolve()
    paths = {n: root_path / n for n in ("transactions.csv", "articles.csv", "customers.csv")}
    skipped: Counter = Counter()
    repaired: Counter = Counter()

    raw = read_csv_utf8(paths["transactions.csv"], dtype=str)
    mapping = {
        "user_id": "customer_id",
        "item_id": "article_id",
        "timestamp": "t_dat",
        "price": "price",
        "channel": "sales_channel_id",
    }
    tx = _interactions(raw, "transactions.csv", mapping, timestamp_format="%Y-%m-%d")
    tx, _ = drop_invalid_prices(tx, skipped, "transactions.csv")
    if same_day_repeats == "merge":
        tx = _merge_same_day(tx, repaired, "transactions.csv")
    else:
        tx = tx.assign(quantity=np.ones(len(tx), dtype="int64"))

    articles = read_csv_utf8(paths["articles.csv"], dtype=str)
    require_columns(articles, ["article_id", *HM_CATEGORICAL, *HM_TEXT], "articles.csv")
    require_ids(articles, ["article_id"], "articles.csv")
    articles = articles.rename(columns={"article_id": "item_id"})
    articles = dedupe_keyed(articles, "item_id", "articles.csv", skipped, "duplicate_item_row")

    images = _scan_images(root_path / "images")
    known = _ordered_union(articles["item_id"], tx["item_id"])
    image_only = sorted(set(images).difference(known))
    items = _build_items(_ordered_union(known, image_only), articles, HM_CATEGORICAL + HM_TEXT, images)
    # article_id = product code + 3-digit colour variant, so every item has its product code,
    # including the purchased articles that articles.csv does not describe.
    derived = items["item_id"].str[:-3].str.lstrip("0")
    items["product_code"] = items["product_code"].str.lstrip("0").where(items["product_code"] != "", derived)
    code = pd.to_numeric(items["product_code"], errors="coerce")
    items["product_code_block"] = (code // 10_000).astype("Int64").astype("string").fillna("").astype(str)

    customers = read_csv_utf8(paths["customers.csv"], dtype=str)
    require_columns(customers, ["customer_id", "age", *HM_USER_FIELDS], "customers.csv")
    require_ids(customers, ["customer_id"], "customers.csv")
    users = pd.DataFrame({"user_id": customers["customer_id"].astype(str)})
    users["age"] = pd.to_numeric(customers["age"], errors="coerce").astype(float)
    bad_age = int((users["age"].isna() & customers["age"].notna()).sum())
    if bad_age:
        log.warning("customers.csv: %d non-numeric age value(s) read as missing", bad_age)
    for f in HM_USER_FIELDS:
        users[f] = customers[f].fillna("").astype(str)
    users = dedupe_keyed(users, "user_id", "customers.csv", skipped, "duplicate_user_row")

    sources = {str(p): file_fingerprint(p) for p in paths.values()}
    sources[str(root_path / "images")] = tree_fingerprint(root_path / "images", "*.jpg")
    log.info(
        "H&M: %d interactions, %d items (%d with image), %d users",
        len(tx), len(items), len(images), len(users),
    )  # fmt: skip
    return RawDataset(
        interactions=_finish(tx),
        items=items,
        users=users.reset_index(drop=True),
        categorical=[*HM_CATEGORICAL, *HM_DERIVED],
        text=list(HM_TEXT),
        skipped=skipped,
        repaired=repaired,
        sources=sources,
    )


# ------------------------------------------------------------------------------------------ MovieLens


def _ml_items_100k(root: Path) -> pd.DataFrame:
    genres = list(ML100K_GENRES)
    genre_file = root / "u.genre"
    if genre_file.is_file():
        table = _read_lines(genre_file, "|", ["name", "index"])
        genres = list(table.sort_values("index", key=lambda s: s.astype(int))["name"])
    names = ["item_id", "title", "release_date", "video_release_date", "url"]
    movies = _read_lines(root / "u.item", "|", names + [f"g{i}" for i in range(len(genres))])
    flags = movies[[f"g{i}" for i in range(len(genres))]].to_numpy() == "1"
    # The "unknown" flag means no genre is known: it maps to "" like a missing value.
    labels = np.array([g if g != "unknown" else "" for g in genres], dtype=object)
    movies["genres"] = ["|".join(g for g in labels[row] if g) for row in flags]
    year_from_date = movies["release_date"].fillna("").str.extract(r"(\d{4})\s*$")[0]
    movies["year"] = movies["title"].fillna("").str.extract(_YEAR_IN_TITLE)[0].fillna(year_from_date)
    return movies


def _ml_users(path: Path, sep: str, names: list[str]) -> pd.DataFrame:
    users = _read_lines(path, sep, names)
    require_ids(users, ["user_id"], path.name)
    out = pd.DataFrame({"user_id": users["user_id"]})
    out["age"] = pd.to_numeric(users["age"], errors="coerce").astype(float)
    for f in ("gender", "occupation"):
        out[f] = users[f].fillna("").astype(str)
    return out


def load_movielens(root: str, images_dir: str | None = None) -> RawDataset:
    """Load MovieLens ratings and movies: ML-100K, ML-1M, or the CSV releases (ml-latest, 20M, 25M).

    Detected by file name: ``u.data`` + ``u.item`` (100K, tab / pipe separated), ``ratings.dat`` +
    ``movies.dat`` (1M, ``::`` separated) or ``ratings.csv`` + ``movies.csv``. The ``.dat`` and ``u.*``
    files are latin-1, their documented encoding. Items get ``genre`` (the first genre), ``genres``
    (the pipe-joined set), ``year`` (from the title) and the ``title`` text; interactions keep the
    ``rating``. Users come from ``u.user`` / ``users.dat`` where present.

    Args:
        root: folder holding the MovieLens files.
        images_dir: poster folder with ``<movie_id>.jpg`` (relative to ``root`` unless absolute);
            default ``root/posters``. Without posters every ``image_path`` is None.
    """
    root_path = Path(root).resolve()
    skipped: Counter = Counter()
    users = pd.DataFrame({"user_id": pd.Series([], dtype=str)})
    if (root_path / "u.data").is_file():
        ratings_file, movies_file = root_path / "u.data", root_path / "u.item"
        raw = _read_lines(ratings_file, "\t", ["user", "item", "rating", "ts"])
        movies = _ml_items_100k(root_path)
        if (root_path / "u.user").is_file():
            users = _ml_users(root_path / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"])
    elif (root_path / "ratings.dat").is_file():
        ratings_file, movies_file = root_path / "ratings.dat", root_path / "movies.dat"
        raw = _read_lines(ratings_file, "::", ["user", "item", "rating", "ts"])
        movies = _read_lines(movies_file, "::", ["item_id", "title", "genres"])
        if (root_path / "users.dat").is_file():
            users = _ml_users(
                root_path / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip"]
            )
    elif (root_path / "ratings.csv").is_file():
        ratings_file, movies_file = root_path / "ratings.csv", root_path / "movies.csv"
        raw = read_csv_utf8(ratings_file, dtype=str).rename(
            columns={"userId": "user", "movieId": "item", "timestamp": "ts"}
        )
        movies = read_csv_utf8(movies_file, dtype=str).rename(columns={"movieId": "item_id"})
        require_columns(movies, ["item_id", "title", "genres"], movies_file.name)
        movies["genres"] = movies["genres"].replace("(no genres listed)", "")
    else:
        raise DataError(
            f"{root_path.name}: no MovieLens ratings found (expected u.data, ratings.dat or ratings.csv)"
        )

    mapping = {"user_id": "user", "item_id": "item", "timestamp": "ts", "rating": "rating"}
    ratings = _interactions(raw, ratings_file.name, mapping)
    ratings, _ = drop_duplicate_rows(ratings, skipped, ratings_file.name)

    require_ids(movies, ["item_id"], movies_file.name)
    movies["genres"] = movies["genres"].fillna("").astype(str)
    movies["genre"] = movies["genres"].str.split("|").str[0].fillna("")
    if "year" not in movies:
        movies["year"] = movies["title"].fillna("").str.extract(_YEAR_IN_TITLE)[0]
    movies["year"] = movies["year"].fillna("")
    movies["title"] = movies["title"].fillna("").astype(str)
    movies = dedupe_keyed(
        movies[["item_id", *ML_CATEGORICAL, *ML_TEXT]],
        "item_id",
        movies_file.name,
        skipped,
        "duplicate_item_row",
    )

    poster_dir = root_path / (images_dir if images_dir is not None else "posters")
    images = _scan_images(poster_dir)
    ids = _ordered_union(movies["item_id"], ratings["item_id"])
    n_extra = len(ids) - len(movies)
    if n_extra:
        log.info(
            "%s: %d rated movie(s) not in %s get empty metadata", ratings_file.name, n_extra, movies_file.name
        )
    items = _build_items(ids, movies, ML_CATEGORICAL + ML_TEXT, images)

    sources = {str(p): file_fingerprint(p) for p in (ratings_file, movies_file)}
    if poster_dir.is_dir():
        sources[str(poster_dir)] = tree_fingerprint(poster_dir, "*.jpg")
    return RawDataset(
        interactions=_finish(ratings),
        items=items,
        users=users.reset_index(drop=True),
        categorical=list(ML_CATEGORICAL),
        text=list(ML_TEXT),
        skipped=skipped,
        sources=sources,
    )


# --------------------------------------------------------------------------------------- any table


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
    """
    root_path = Path(root).resolve()
    skipped: Counter = Counter()
    columns = dict(columns or {})
    item_columns = dict(item_columns or {})
    categorical, text = list(categorical), list(text)

    inter_path = root_path / interactions
    raw = _read_table(inter_path)
    mapping = {c: columns.get(c, c) for c in INTERACTION_COLUMNS}
    for c in INTERACTION_OPTIONAL:
        if c in columns or c in raw.columns:
            mapping[c] = columns.get(c, c)
    mapping.update({c: s for c, s in columns.items() if c not in mapping})
    df = _interactions(raw, inter_path.name, mapping, timestamp_format)
    if "price" in df:
        df, _ = drop_invalid_prices(df, skipped, inter_path.name)
    df, _ = drop_duplicate_rows(df, skipped, inter_path.name)

    image_root = root_path / image_dir if image_dir is not None else root_path
    sources = {str(inter_path): file_fingerprint(inter_path)}
    fields = categorical + text
    meta = None
    if items is not None:
        items_path = root_path / items
        meta = _read_table(items_path)
        source_of = {c: item_columns.get(c, c) for c in ["item_id", *fields]}
        if "image" in item_columns:
            source_of["image"] = item_columns["image"]
        require_columns(meta, list(source_of.values()), items_path.name)
        meta = meta.assign(**{source_of["item_id"]: to_id_str(meta[source_of["item_id"]])})
        require_ids(meta, [source_of["item_id"]], items_path.name)
        meta = pd.DataFrame({c: meta[s] for c, s in source_of.items()}, index=meta.index)
        meta = dedupe_keyed(meta, "item_id", items_path.name, skipped, "duplicate_item_row")
        df, _ = drop_unknown_items(df, pd.Index(meta["item_id"]), skipped, inter_path.name)
        ids = pd.Index(meta["item_id"], dtype=object)
        sources[str(items_path)] = file_fingerprint(items_path)
    else:
        ids = _ordered_union(df["item_id"])
        if fields:
            raise DataError(f"{inter_path.name}: categorical/text item fields {fields} need an items file")

    if meta is not None and "image" in meta:
        images = {}
        for item_id, name in zip(meta["item_id"], meta["image"], strict=True):
            if isinstance(name, str) and name.strip():
                # Kept even when the file is missing: the image cache counts it as missing_file.
                images[item_id] = str((image_root / name).resolve())
        found = sum(Path(p).is_file() for p in images.values())
        log.info("%s: %d of %d item image file(s) found", items, found, len(meta))
    else:
        images = _scan_images(image_root) if image_dir is not None else {}
    if image_dir is not None and image_root.is_dir():
        sources[str(image_root)] = tree_fingerprint(image_root, "*")

    return RawDataset(
        interactions=_finish(df),
        items=_build_items(ids, meta, fields, images),
        categorical=categorical,
        text=text,
        skipped=skipped,
        sources=sources,
    )
