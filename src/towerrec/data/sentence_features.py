"""Precomputed sentence-model features of each item's text: which text, the file, its sidecar, checks.

``scripts/precompute_text_features.py`` writes a float32 ``(items + 1, dim)`` array (row 0, the
padding item, and items without any text are zero) and a sidecar JSON beside it
(``<file>.json``) recording the model (name, package and version), the processed data it was built
from and the file's own SHA-256. The DataModule reads it through :func:`load_sentence_features`,
which refuses, in one line, a file that does not belong to the processed data: another row count,
other item texts, or a file changed since it was written.

Data code: no torch model and no sentence-transformers import here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from towerrec.data.schema import DataError
from towerrec.fileio import file_sha256, text_sha256, write_json

#: The item text the sentence model reads: name, type and description, in this order, where present
#: (H&M: title = product name, product type, detail description; MovieLens: title and genres).
SENTENCE_COLUMNS = ("title", "product_type_name", "detail_desc", "genres")
#: How the script is run, for error messages.
SCRIPT = "python scripts/precompute_text_features.py"


def item_texts(items: pd.DataFrame, columns: tuple[str, ...] = SENTENCE_COLUMNS) -> list[str]:
    """One text per item row: the distinct non-empty values of ``columns``, joined by ". "."""
    cols = [c for c in columns if c in items]
    if not cols:
        return [""] * len(items)
    values = items[cols].fillna("").astype(str).apply(lambda c: c.str.strip())
    return [". ".join(dict.fromkeys(v for v in row if v)) for row in values.itertuples(index=False)]


def texts_sha256(items: pd.DataFrame, texts: list[str]) -> str:
    """SHA-256 of the ``(item_idx, item_id, text)`` lines: what a features file was computed from."""
    ids = items["item_id"].astype(str) if "item_id" in items else pd.Series([""] * len(items))
    lines = (f"{i}\t{d}\t{t}" for i, d, t in zip(items["item_idx"], ids, texts, strict=True))
    return text_sha256("\n".join(lines))


def sidecar_path(path: str | os.PathLike) -> Path:
    """``features.npy`` -> ``features.npy.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_sentence_features(path: str | os.PathLike, values: np.ndarray, info: dict) -> dict:
    """Write ``values`` to ``path`` (``.npy``) and its sidecar; return the sidecar's content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, values.astype(np.float32))
    os.replace(tmp, path)
    meta = {**info, "file": path.name, "rows": int(values.shape[0]), "dim": int(values.shape[1]), "sha256": file_sha256(path)}
    write_json(sidecar_path(path), meta)
    return meta


def load_sentence_features(path: str | os.PathLike, items: pd.DataFrame, manifest: dict) -> tuple[np.ndarray, dict]:
    """The features of ``path`` for the processed items, and what the run records about them.

    Args:
        path: the ``.npy`` the script wrote.
        items: the processed folder's ``items.parquet``.
        manifest: the processed folder's manifest.

    Returns:
        The ``(items + 1, dim)`` float32 array, and ``{file, sha256, model, model_version, ...}``.

    Raises:
        DataError: one line naming the file: missing, no sidecar, changed since written, or built
            for other processed data.
    """
    path = Path(path)
    rebuild = f"rebuild it: {SCRIPT} <the run's overrides>"
    if not path.is_file():
        raise DataError(f"{path}: no such sentence-features file; {rebuild}")
    side = sidecar_path(path)
    if not side.is_file():
        raise DataError(f"{path}: no sidecar {side.name} (model and data it was built from); {rebuild}")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{side}: not valid JSON ({err.msg}, line {err.lineno}); {rebuild}") from None
    sha = file_sha256(path)
    if sha != meta.get("sha256"):
        raise DataError(f"{path}: sha256 {sha[:12]} differs from its sidecar's {str(meta.get('sha256'))[:12]}: changed since written; {rebuild}")
    values = np.load(path)
    n = len(items) + 1
    if values.ndim != 2 or values.shape[0] != n:
        raise DataError(f"{path}: {values.shape[0]} rows, but the processed data has {n} (items + padding); {rebuild}")
    columns = tuple(meta.get("columns") or SENTENCE_COLUMNS)
    if meta.get("texts_sha256") != texts_sha256(items, item_texts(items, columns)):
        built, here = str(meta.get("data_config_hash"))[:12], str(manifest.get("config_hash"))[:12]
        raise DataError(f"{path}: built from other item texts (data {built}) than this processed data ({here}); {rebuild}")
    used = {k: meta.get(k) for k in ("file", "sha256", "model", "model_package", "model_version", "dim", "columns")}
    return values.astype(np.float32, copy=False), {**used, "path": str(path.resolve())}
