"""MovieLens ratings and movies: ML-100K, ML-1M and the CSV releases, detected from the file names.

The MovieLens file layouts and column names live here and only here.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from towerrec.data import engine
from towerrec.data.schema import DataError, RawDataset
from towerrec.data.sources.readers import (
    build_items,
    canonical_interactions,
    engine_result,
    ordered_union,
    read_lines,
    scan_images,
    source_engine,
)
from towerrec.data.validate import (
    dedupe_keyed,
    drop_duplicate_rows,
    read_csv_utf8,
    require_columns,
    require_ids,
)
from towerrec.fileio import file_fingerprint, tree_fingerprint

log = logging.getLogger(__name__)

ML_CATEGORICAL = ["genre", "genres", "year"]
ML_TEXT = ["title"]
# Order of the 19 genre flags in ML-100K's u.item (used when u.genre is absent).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]  # fmt: skip
_YEAR_IN_TITLE = r"\((\d{4})\)\s*$"


def _ml_items_100k(root: Path) -> pd.DataFrame:
    genres = list(ML100K_GENRES)
    genre_file = root / "u.genre"
    if genre_file.is_file():
        table = read_lines(genre_file, "|", ["name", "index"])
        genres = list(table.sort_values("index", key=lambda s: s.astype(int))["name"])
    names = ["item_id", "title", "release_date", "video_release_date", "url"]
    movies = read_lines(root / "u.item", "|", names + [f"g{i}" for i in range(len(genres))])
    flags = movies[[f"g{i}" for i in range(len(genres))]].to_numpy() == "1"
    # The "unknown" flag means no genre is known: it maps to "" like a missing value.
    labels = np.array([g if g != "unknown" else "" for g in genres], dtype=object)
    movies["genres"] = ["|".join(g for g in labels[row] if g) for row in flags]
    year_from_date = movies["release_date"].fillna("").str.extract(r"(\d{4})\s*$")[0]
    movies["year"] = movies["title"].fillna("").str.extract(_YEAR_IN_TITLE)[0].fillna(year_from_date)
    return movies


def _ml_users(path: Path, sep: str, names: list[str]) -> pd.DataFrame:
    users = read_lines(path, sep, names)
    require_ids(users, ["user_id"], path.name)
    out = pd.DataFrame({"user_id": users["user_id"]})
    out["age"] = pd.to_numeric(users["age"], errors="coerce").astype(float)
    for f in ("gender", "occupation"):
        out[f] = users[f].fillna("").astype(str)
    return out


def load_movielens(
    root: str, images_dir: str | None = None, con: duckdb.DuckDBPyConnection | None = None
) -> RawDataset:
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
        con: a preparing build's DuckDB connection: repeated ratings are dropped in its engine and
            the interactions returned as an engine table's name (without one, as a pandas frame).
    """
    root_path = Path(root).resolve()
    skipped: Counter = Counter()
    ratings_file, movies_file, raw, movies, users = _ml_release(root_path)

    mapping = {"user_id": "user", "item_id": "item", "timestamp": "ts", "rating": "rating"}
    ratings = canonical_interactions(raw, ratings_file.name, mapping)
    with source_engine(con) as db:
        engine.append_frame(db, ratings, "ml_ratings", create=True)
        table = drop_duplicate_rows(db, "ml_ratings", skipped, ratings_file.name)
        rated = [
            r[0]
            for r in db.execute(f"SELECT item_id FROM {table} GROUP BY item_id ORDER BY min(row)").fetchall()
        ]
        interactions = engine_result(db, table, con)
    del ratings, raw

    movies = _ml_movies(movies, movies_file.name, skipped)

    poster_dir = root_path / (images_dir if images_dir is not None else "posters")
    images = scan_images(poster_dir)
    ids = ordered_union(movies["item_id"], rated)
    n_extra = len(ids) - len(movies)
    if n_extra:
        log.info(
            "%s: %d rated movie(s) not in %s get empty metadata", ratings_file.name, n_extra, movies_file.name
        )
    items = build_items(ids, movies, ML_CATEGORICAL + ML_TEXT, images)

    sources = {str(p): file_fingerprint(p) for p in (ratings_file, movies_file)}
    if poster_dir.is_dir():
        sources[str(poster_dir)] = tree_fingerprint(poster_dir, "*.jpg")
    return RawDataset(
        interactions=interactions,
        items=items,
        users=users.reset_index(drop=True),
        categorical=list(ML_CATEGORICAL),
        text=list(ML_TEXT),
        skipped=skipped,
        sources=sources,
    )


def _ml_release(root_path: Path) -> tuple[Path, Path, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The ratings and movies files of the release in ``root_path`` (by file name), read.

    Returns:
        The ratings file, the movies file, the raw ratings (``user``, ``item``, ``rating``, ``ts``),
        the movies and the users (empty where the release has no user file).
    """
    users = pd.DataFrame({"user_id": pd.Series([], dtype=str)})
    if (root_path / "u.data").is_file():
        ratings_file, movies_file = root_path / "u.data", root_path / "u.item"
        raw = read_lines(ratings_file, "\t", ["user", "item", "rating", "ts"])
        movies = _ml_items_100k(root_path)
        if (root_path / "u.user").is_file():
            users = _ml_users(root_path / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"])
    elif (root_path / "ratings.dat").is_file():
        ratings_file, movies_file = root_path / "ratings.dat", root_path / "movies.dat"
        raw = read_lines(ratings_file, "::", ["user", "item", "rating", "ts"])
        movies = read_lines(movies_file, "::", ["item_id", "title", "genres"])
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
    return ratings_file, movies_file, raw, movies, users


def _ml_movies(movies: pd.DataFrame, file_name: str, skipped: Counter) -> pd.DataFrame:
    """The movies' ``genres``, first ``genre``, ``year`` (from the title) and ``title``, one row per id."""
    require_ids(movies, ["item_id"], file_name)
    movies["genres"] = movies["genres"].fillna("").astype(str)
    movies["genre"] = movies["genres"].str.split("|").str[0].fillna("")
    if "year" not in movies:
        movies["year"] = movies["title"].fillna("").str.extract(_YEAR_IN_TITLE)[0]
    movies["year"] = movies["year"].fillna("")
    movies["title"] = movies["title"].fillna("").astype(str)
    return dedupe_keyed(
        movies[["item_id", *ML_CATEGORICAL, *ML_TEXT]],
        "item_id",
        file_name,
        skipped,
        "duplicate_item_row",
    )
