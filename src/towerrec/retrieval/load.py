"""Load an export folder, verify it against its manifest, and answer item-to-item queries (history
queries: ``Recommender(index)`` in :mod:`towerrec.retrieval.recommend`)."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from towerrec.fileio import load_npy
from towerrec.retrieval.folder import EMBEDDINGS_FILE, INDEX_FILE, ITEMS_FILE, ExportError, read_verified
from towerrec.retrieval.hits import Hit, UnknownItemError
from towerrec.retrieval.index import (
    METRIC,
    METRIC_NAME,
    gpu_off,
    mmap_flags,
    read_index,
    search,
    select_faiss_device,
    set_params,
)

log = logging.getLogger(__name__)


class ItemIndex:
    """An export folder, loaded: the FAISS index, the item table and the item embeddings.

    Use :func:`load_export` to make one.
    """

    def __init__(
        self, root: Path, manifest: dict, index: faiss.Index, items: pd.DataFrame, embeddings: np.ndarray
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.index = index
        self.items = items
        self.embeddings = embeddings  # (N, D), row r = items.iloc[r]
        self._item_idx = items["item_idx"].to_numpy()
        self._row_of_id = {item_id: row for row, item_id in enumerate(items["item_id"].to_numpy().tolist())}
        self._row_of_idx = np.full(int(self._item_idx.max(initial=0)) + 1, -1, dtype=np.int64)
        self._row_of_idx[self._item_idx] = np.arange(len(items))
        self._image_cache: np.ndarray | None = None
        # Plain lists for the per-hit lookups: a pandas row lookup costs more than the search itself.
        self._item_id = items["item_id"].astype(str).tolist()
        self._title = items["title"].astype(str).tolist()
        self._image_path = items["image_path"].tolist()
        self._is_cold = items["is_cold"].astype(bool).tolist()

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ItemIndex({str(self.root)!r}, {self.manifest['factory']!r}, {len(self)} items)"

    # ------------------------------------------------------------------ lookups
    def rows(self, item_ids: list[str]) -> np.ndarray:
        """Rows of raw item ids; an unknown id raises :class:`UnknownItemError`."""
        missing = [i for i in item_ids if i not in self._row_of_id]
        if missing:
            raise UnknownItemError(
                f"unknown item id(s) {', '.join(map(str, missing[:5]))} (not in {self.root})"
            )
        return np.fromiter((self._row_of_id[i] for i in item_ids), dtype=np.int64, count=len(item_ids))

    def item_idx(self, item_ids: list[str]) -> np.ndarray:
        """The project's item indices of raw item ids."""
        return self._item_idx[self.rows(item_ids)]

    def embedding(self, item_id: str) -> np.ndarray:
        """The ``(D,)`` exported embedding of one item."""
        return self.embeddings[self.rows([item_id])[0]]

    def _hit(self, item_idx: int, score: float) -> Hit:
        r = int(self._row_of_idx[item_idx])
        image = self._image_path[r]
        return Hit(
            item_id=self._item_id[r],
            item_idx=int(item_idx),
            score=float(score),
            title=self._title[r],
            image=image if isinstance(image, str) else None,
            is_cold=self._is_cold[r],
        )

    def describe(self, item_id: str) -> Hit:
        """The query item as a :class:`Hit` with score 1 (its similarity to itself)."""
        return self._hit(int(self.item_idx([item_id])[0]), 1.0)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw index search: ``(scores, item_idx)``, each ``(B, k)``; -1 where fewer than k were found."""
        return search(self.index, queries, k)

    def search_vector(self, query: np.ndarray, k: int = 10, exclude_idx: set[int] | None = None) -> list[Hit]:
        """The top-k items for one ``(D,)`` unit-norm query, leaving out the item indices ``exclude_idx``."""
        return self.search_vectors(np.reshape(query, (1, -1)), [k], [exclude_idx or set()])[0]

    def search_vectors(self, queries: np.ndarray, ks: list[int], exclude_idx: list[set[int]]) -> list[list[Hit]]:
        """The top ``ks[i]`` items for each row of ``(B, D)`` unit-norm ``queries`` in one index search,
        leaving out the item indices ``exclude_idx[i]``. A row's hits do not depend on the other rows
        (FAISS scores a query the same way alone or in a batch below its BLAS threshold)."""
        fetch = min(len(self), max(k + len(ex) for k, ex in zip(ks, exclude_idx, strict=True)))
        all_scores, all_found = self.search(queries, fetch)
        out = []
        for scores, found, k, ex in zip(all_scores.tolist(), all_found.tolist(), ks, exclude_idx, strict=True):
            hits = [self._hit(i, s) for s, i in zip(scores, found, strict=True) if i >= 0 and i not in ex]
            out.append(hits[:k])
        return out

    def similar_items(
        self, item_id: str, k: int = 10, exclude: list[str] | tuple[str, ...] = ()
    ) -> list[Hit]:
        """Items most similar to ``item_id`` (never the item itself), best first.

        Args:
            item_id: the raw id of the query item.
            k: items to return.
            exclude: raw ids to leave out as well.
        """
        return self.similar_items_many([(item_id, k, exclude)])[0]

    def similar_items_many(self, queries: list[tuple[str, int, list[str] | tuple[str, ...]]]) -> list[list[Hit]]:
        """:meth:`similar_items` of each ``(item_id, k, exclude)``, searched together (one index call)."""
        rows = self.rows([item_id for item_id, _, _ in queries])
        excluded = [set(self.item_idx([item_id, *exclude]).tolist()) for item_id, _, exclude in queries]
        vectors = np.asarray(self.embeddings[rows], dtype=np.float32)  # (B, D)
        return self.search_vectors(vectors, [k for _, k, _ in queries], excluded)

    # ------------------------------------------------------------------ images
    def image(self, item_id: str) -> np.ndarray | None:
        """The item's image as ``(H, W, 3)`` uint8: its image file, else its row of the image cache."""
        row = self.items.iloc[self.rows([item_id])[0]]
        if not row["has_image"]:
            return None
        path = row["image_path"]
        if isinstance(path, str) and Path(path).is_file():
            from PIL import Image

            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        cache = self.manifest.get("image_cache")
        if cache and Path(cache).is_file():
            if self._image_cache is None:
                self._image_cache = load_npy(cache, mmap_mode="r")
            if row["item_idx"] < len(self._image_cache):
                return np.asarray(self._image_cache[row["item_idx"]])
        return None


def search_params_of(manifest: dict) -> dict[str, float]:
    """The search setting an export is searched with: its operating point (chosen at export for
    ``index.target_recall``), else its config's ``search_params`` (exports written before tuning)."""
    point = manifest.get("operating_point")
    if point is not None:
        return dict(point.get("params") or {})
    return dict(manifest["index"]["spec"].get("search_params") or {})


def load_export(path: str | Path, verify: bool = True, gpu: bool | str = False, mmap: bool = True) -> ItemIndex:
    """Load an export folder written by ``towerrec-export``.

    Args:
        path: the export folder.
        verify: check every file's sha256 against the manifest before reading it. Sizes, dimension,
            counts and metric are checked either way.
        gpu: search on a GPU: ``auto`` when FAISS sees one and supports the index type, ``true`` asks
            for one (falling back to CPU with a log line), ``false`` never.
        mmap: map the index's vectors and the item embeddings from their files instead of reading
            them into memory, where the index type allows (:func:`~towerrec.retrieval.index.mmap_flags`):
            processes serving one export then share one copy.

    Raises:
        ExportError: with a one-line reason, for a missing, edited, mismatched or foreign folder.
    """
    root = Path(path)
    manifest = read_verified(root, METRIC_NAME, verify)
    dim, count = int(manifest["dim"]), int(manifest["count"])
    flags = mmap_flags(manifest["factory"]) if mmap and gpu_off(gpu) else 0
    index = read_index(root / INDEX_FILE, flags)
    items = pd.read_parquet(root / ITEMS_FILE)
    embeddings = load_npy(root / EMBEDDINGS_FILE, mmap_mode="r" if mmap else None)
    checks = [
        (index.d == dim, f"index dimension {index.d} != manifest dim {dim}"),
        (index.ntotal == count, f"index holds {index.ntotal} vectors, manifest count is {count}"),
        (index.metric_type == METRIC, f"index metric {index.metric_type} is not inner product"),
        (len(items) == count, f"{ITEMS_FILE} has {len(items)} rows, manifest count is {count}"),
        (embeddings.shape == (count, dim), f"{EMBEDDINGS_FILE} shape {embeddings.shape} != ({count}, {dim})"),
        (items["item_id"].is_unique, f"{ITEMS_FILE} has repeated item ids"),
        (items["item_idx"].is_unique, f"{ITEMS_FILE} has repeated item_idx"),
    ]
    for ok, what in checks:
        if not ok:
            raise ExportError(f"{root}: {what}; re-run towerrec-export")
    search_params = search_params_of(manifest)
    device, reason = select_faiss_device(gpu, faiss.get_num_gpus(), manifest["factory"])
    if device == "gpu":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    elif not gpu_off(gpu):
        log.info("%s", reason)
    set_params(index, search_params)
    log.info("loaded %s: %s, %d items, searching on %s", root, manifest["factory"], count, device)
    return ItemIndex(root, manifest, index, items, embeddings)
