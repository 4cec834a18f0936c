"""Per-user result files: each evaluated user's metrics in the item slices, with what they were scored on.

``towerrec-train`` writes ``test_per_user.parquet`` into its run folder and ``towerrec-eval`` writes
``<split>_per_user.parquet`` beside each scorer's ``metrics.json``; ``towerrec-compare`` and
``towerrec-reproduce`` read them to compare scorers user by user. A file holds ``user_idx`` and one
``<slice>/<metric>@k`` column per value (NaN where the user has no target in the slice); the pooled
file of a rolling backtest also has a ``fold`` column, and a user is identified by (fold, user_idx).

What identifies the evaluation (the scorer's name, the split and the processed data's name and config
hash) travels in the parquet file's metadata; a file without it is identified by the ``metrics.json``
beside it (a :class:`~towerrec.evaluation.results.Results` record of one scorer), which both commands write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from towerrec.evaluation.results import read_results

_META_KEY = b"towerrec"


def pair_keys(frame: pd.DataFrame) -> list[str]:
    """The columns that identify an evaluated user: ``fold`` and ``user_idx`` in a rolling backtest's
    pooled file (a user is evaluated once per fold), else ``user_idx``."""
    return ["fold", "user_idx"] if "fold" in frame else ["user_idx"]


def per_user_name(split: str) -> str:
    """The file name of a split's per-user results: ``test_per_user.parquet`` for the test split."""
    return f"{split}_per_user.parquet"


def write_per_user(
    frame: pd.DataFrame, path: str | Path, model: str, split: str, data: dict, chunk_rows: int = 1 << 18
) -> Path:
    """Write ``frame`` to ``path`` with its identity in the parquet metadata, ``chunk_rows`` rows at a
    time (one row group each: the Arrow copy never holds more than one chunk).

    Args:
        frame: ``user_idx`` and ``<slice>/<metric>@k`` columns (:func:`~towerrec.evaluation.evaluator.per_user_frame`).
        model: the scorer's name.
        split: ``val`` or ``test``.
        data: at least the processed data's ``name`` and ``config_hash``.
    """
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    meta = {"model": model, "split": split, "data": {"name": data["name"], "config_hash": data["config_hash"]}}
    schema = schema.with_metadata({**(schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
    path = Path(path)
    with pq.ParquetWriter(path, schema) as out:
        for lo in range(0, max(len(frame), 1), chunk_rows):
            out.write_table(pa.Table.from_pandas(frame.iloc[lo : lo + chunk_rows], schema=schema, preserve_index=False))
    return path


def _meta_from_metrics_json(path: Path) -> dict:
    """The identity of a per-user file from the ``metrics.json`` beside it (towerrec-train's run folder)."""
    metrics = path.with_name("metrics.json")
    if not metrics.is_file():
        raise ValueError(f"{path}: no towerrec metadata in the file and no metrics.json beside it")
    record = read_results(metrics)  # a ResultsError (a ValueError) in one line for anything else
    if len(record.models) != 1:
        raise ValueError(f"{metrics}: {len(record.models)} scorers in the record beside {path.name}, expected one")
    data = record.data
    if not isinstance(data.get("name"), str) or not isinstance(data.get("config_hash"), str):
        raise ValueError(f"{metrics}: the record's data has no name or config_hash")
    model = next(iter(record.models))
    return {"model": model, "split": record.split, "data": {"name": data["name"], "config_hash": data["config_hash"]}}


def resolve_per_user(path: str | Path, split: str = "test") -> Path:
    """A per-user file: ``path`` itself, or the ``<split>_per_user.parquet`` in the folder ``path``."""
    path = Path(path)
    if path.is_dir():
        path = path / per_user_name(split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such per-user results file")
    return path


def read_per_user(path: str | Path, split: str = "test") -> tuple[pd.DataFrame, dict]:
    """A per-user table and its identity ``{"model", "split", "data": {"name", "config_hash"}}``.

    Args:
        path: a per-user parquet file, or a folder holding ``<split>_per_user.parquet`` (a towerrec-train
            run folder, a towerrec-eval output or one scorer's folder in it).
        split: the split whose file a folder is searched for.
    """
    path = resolve_per_user(path, split)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a parquet file ({err})") from err
    raw = (table.schema.metadata or {}).get(_META_KEY)
    meta = json.loads(raw) if raw else _meta_from_metrics_json(path)
    frame = table.to_pandas()
    if "user_idx" not in frame:
        raise ValueError(f"{path}: no user_idx column (not a per-user results file)")
    keys = pair_keys(frame)
    duplicated = frame.duplicated(keys)
    if duplicated.any():
        first = frame.loc[duplicated, keys].iloc[0].tolist()
        raise ValueError(f"{path}: {'/'.join(keys)} {'/'.join(map(str, first))} appears twice")
    return frame, meta
