"""Export: embed every catalogue item with a trained checkpoint, build the FAISS index, write the folder.

The folder holds everything retrieval reads, written to a temporary folder first and renamed into
place, so a reader never sees half an export:

- ``index.faiss``: the CPU index, ids = item indices (``IDMap2``)
- ``item_ids.parquet``: row -> item_idx, item_id (the raw id), title, image_path, is_cold, has_image
- ``item_embeddings.npy``: ``(N, D)`` float32 unit-norm item embeddings, aligned with the rows
- ``manifest.json``: checkpoint and sha256, configs, sizes, recall against exact search, versions,
  and the sha256 of every other file
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

import towerrec
from towerrec.checkpoint import file_sha256, load_trained
from towerrec.retrieval.index import (
    METRIC_NAME,
    IndexSpec,
    build_index,
    measure_recall,
    normalized,
    set_params,
)

log = logging.getLogger(__name__)

FORMAT = "towerrec-export/1"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "item_ids.parquet"
EMBEDDINGS_FILE = "item_embeddings.npy"
MANIFEST_FILE = "manifest.json"
# Item-table columns that can serve as a display title, best first.
TITLE_COLUMNS = ("title", "prod_name", "name", "product_type_name")


class ExportError(RuntimeError):
    """An export folder that cannot be written, or read back as it was written."""


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own ``manifest_sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def item_table(items: pd.DataFrame) -> pd.DataFrame:
    """The exported item table, one row per catalogue item in item-index order."""
    items = items.sort_values("item_idx").reset_index(drop=True)
    title = pd.Series("", index=items.index, dtype=object)
    for col in TITLE_COLUMNS:
        if col in items:
            value = items[col].fillna("").astype(str).str.strip()
            title = title.where(title != "", value)
    item_id = items["item_id"].astype(str)
    image = items["image_path"] if "image_path" in items else pd.Series(None, index=items.index)
    return pd.DataFrame(
        {
            "item_idx": items["item_idx"].astype(np.int64),
            "item_id": item_id,
            "title": title.where(title != "", item_id).astype(str),
            "image_path": image.astype(object).where(image.notna(), None),
            "is_cold": items["is_cold"].astype(bool),
            "has_image": items["has_image"].astype(bool) if "has_image" in items else image.notna(),
        }
    )


def _write_atomically(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing an old export only when asked."""
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} already exists; pass overwrite=true to replace it")
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


@torch.no_grad()
def export_index(
    ckpt_path: str | Path,
    spec: IndexSpec,
    out_dir: str | Path,
    processed_dir: str | None = None,
    device: str = "cpu",
    recall_k: int = 10,
    n_queries: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    config: dict | None = None,
    warn_below: float = 0.9,
) -> Path:
    """Embed the catalogue with ``ckpt_path``, build ``spec`` and write the export folder.

    Args:
        ckpt_path: a ``.ckpt`` from ``towerrec-train``.
        spec: the index config.
        out_dir: the export folder to write.
        processed_dir: the processed data folder, when it moved since training.
        device: where the towers run.
        recall_k: the k of the recall check against exact search.
        n_queries: user queries (test-split histories) and item queries sampled for the recall check.
        seed: the query-sample seed.
        overwrite: replace an existing ``out_dir``.
        config: the resolved run config, recorded in the manifest.
        warn_below: log a warning when the recall check comes out below this.

    Returns:
        The export folder.
    """
    ckpt_path = Path(ckpt_path).resolve()
    out = Path(out_dir).resolve()
    if not ckpt_path.is_file():
        raise ExportError(f"checkpoint {ckpt_path} not found")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=true to replace it")
    t_start = time.perf_counter()
    model, dm, train_cfg = load_trained(ckpt_path, processed_dir=processed_dir, device=device)
    items = item_table(dm.items)
    n = len(items)
    if not np.array_equal(items["item_idx"].to_numpy(), np.arange(1, n + 1)):
        raise ExportError(f"{dm.processed_dir}: item_idx must run 1..{n} (row 0 is padding)")

    # Every catalogue item, never-bought ones too: the tower embeds cold items from image and content.
    t0 = time.perf_counter()
    emb_all = model.item_tower.embed_all()  # (N+1, D), row 0 padding
    vectors = normalized(emb_all[1:].float().cpu().numpy())  # (N, D)
    ids = items["item_idx"].to_numpy()
    embed_seconds = time.perf_counter() - t0
    built = build_index(spec, vectors, ids, keep_on_device=True)
    log.info("built %s over %d items in %.1fs on %s", built.factory, n, built.build_seconds, built.device)

    # Recall against exact search, for the queries retrieval serves: users (their test-split
    # histories through the user tower) and items (item-to-item).
    rng = np.random.default_rng(seed)
    split = dm.test_split if len(dm.test_split) else dm.val_split
    users = np.sort(rng.choice(len(split), min(n_queries, len(split)), replace=False))
    user_q = np.zeros((0, vectors.shape[1]), np.float32)
    if len(users):
        history = split.history[torch.from_numpy(users)].to(emb_all.device)
        user_q = model.user_embeddings(history, emb_all).float().cpu().numpy()  # (U, D)
    item_q = vectors[np.sort(rng.choice(n, min(n_queries, n), replace=False))]
    recall = {
        "k": recall_k,
        "reference": "exact inner-product search (faiss.contrib.exhaustive_search.knn)",
        "queries": "user: test-split histories through the user tower; item: catalogue items (each finds itself)",
        "user_queries": len(user_q),
        "item_queries": len(item_q),
        "recall_user": measure_recall(built.index, vectors, ids, user_q, recall_k) if len(user_q) else None,
        "recall_item": measure_recall(built.index, vectors, ids, item_q, recall_k),
    }
    index = built.index
    if built.device == "gpu":  # the saved index is a CPU index; GPU loading is the reader's choice
        index = faiss.index_gpu_to_cpu(index)
        set_params(index, built.spec.search_params)
    log.info(
        "recall@%d vs exact: users %s, items %.4f", recall_k, recall["recall_user"], recall["recall_item"]
    )
    worst = min(r for r in (recall["recall_user"], recall["recall_item"]) if r is not None)
    if worst < warn_below:
        log.warning(
            "recall@%d against exact search is %.3f (< %.2f): raise efSearch / nprobe in configs/index/%s.yaml, "
            "or use index=flat (exact) for a catalogue this size",
            recall_k, worst, warn_below, spec.name,
        )  # fmt: skip

    image_cache = Path(dm.processed_dir).resolve() / "images.npy"
    model_cfg = train_cfg.model
    manifest = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": str(ckpt_path), "sha256": file_sha256(ckpt_path)},
        "data": {
            "name": str(train_cfg.data.name),
            "processed_dir": str(Path(dm.processed_dir).resolve()),
            "config_hash": dm.manifest.get("config_hash"),
        },
        "model": {"dim": int(model_cfg.dim), "max_history": int(dm.max_history)},
        "config": config if config is not None else {"index": asdict(spec)},
        "index": {
            "name": spec.name,
            "spec": asdict(built.spec),
            "device": built.device,
            "device_reason": built.device_reason,
        },
        "factory": built.factory,
        "metric": METRIC_NAME,
        "dim": int(vectors.shape[1]),
        "count": n,
        "cold_count": int(items["is_cold"].sum()),
        "embed_seconds": round(embed_seconds, 3),
        "train_seconds": round(built.train_seconds, 3),
        "build_seconds": round(built.build_seconds, 3),
        "recall": recall,
        "image_cache": str(image_cache) if image_cache.exists() else None,
        "versions": {
            "faiss": faiss.__version__,
            "torch": torch.__version__,
            "towerrec": towerrec.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        items.to_parquet(tmp / ITEMS_FILE, index=False)
        np.save(tmp / EMBEDDINGS_FILE, vectors)
        manifest["files"] = {
            name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE)
        }
        manifest["seconds"] = round(time.perf_counter() - t_start, 3)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _write_atomically(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("export written to %s", out)
    return out
