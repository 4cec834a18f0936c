"""Export: embed every catalogue item with a trained checkpoint, build the FAISS index, write the folder.

The folder holds everything retrieval reads (names and format in :mod:`towerrec.retrieval.folder`),
written to a temporary folder first and renamed into place, so a reader never sees half an export:

- ``index.faiss``: the CPU index, ids = item indices (``IDMap2``)
- ``item_ids.parquet``: row -> item_idx, item_id (the raw id), title, image_path, is_cold, has_image
- ``item_embeddings.npy``: ``(N, D)`` float32 unit-norm item embeddings, aligned with the rows
- ``manifest.json``: checkpoint and sha256, configs, sizes, recall against exact search, versions,
  and the sha256 of every other file

With ``users=True`` (and only then) it also holds the customers, for audience queries
(:mod:`towerrec.retrieval.customers`): their user-tower embeddings from their history up to the data's
cut-off, an index of the same factory and metric over them, their segments and past purchases. The
manifest's ``customer_data`` says whether an export holds customer data.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import towerrec
from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.sequences import SPLIT_CODES, Sequences, distinct_pairs, last_items
from towerrec.fileio import atomic_folder, file_sha256, folder_files
from towerrec.models.checkpoint import load_trained
from towerrec.models.two_tower import TwoTowerModule
from towerrec.retrieval.customers import (
    CUSTOMER_EMBEDDINGS_FILE,
    CUSTOMER_FILES,
    CUSTOMER_INDEX_FILE,
    CUSTOMERS_FILE,
    PURCHASES_FILE,
)
from towerrec.retrieval.folder import EMBEDDINGS_FILE, FORMAT, INDEX_FILE, ITEMS_FILE, ExportError, seal
from towerrec.retrieval.index import (
    METRIC_NAME,
    BuiltIndex,
    IndexSpec,
    ann_recall,
    build_index,
    exact_search,
    measure_recall,
    normalized,
    search,
)
from towerrec.retrieval.tune import TargetRecallError as TuneError
from towerrec.retrieval.tune import Tuned, tune_built

log = logging.getLogger(__name__)


def item_table(items: pd.DataFrame) -> pd.DataFrame:
    """The exported item table, one row per catalogue item in item-index order.

    The display title is the processed table's ``title`` column (each source names its own title
    field there), else the raw id.
    """
    items = items.sort_values("item_idx").reset_index(drop=True)
    item_id = items["item_id"].astype(str)
    title = items["title"].fillna("").astype(str).str.strip() if "title" in items else pd.Series("", index=items.index)
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


def recall_check(
    model: TwoTowerModule,
    dm: SequenceDataModule,
    built: BuiltIndex,
    item_emb: torch.Tensor,
    vectors: np.ndarray,
    ids: np.ndarray,
    k: int,
    n_queries: int,
    seed: int,
) -> dict:
    """Recall@k of the index against exact search, for the queries retrieval serves.

    Users: test-split histories through the user tower; the exact reference is the model's own full
    ranking (:meth:`TwoTowerModule.rank`). Items: catalogue items (item-to-item), against exact
    inner-product search.
    """
    rng = np.random.default_rng(seed)
    split = dm.test_split if len(dm.test_split) else dm.val_split
    users = np.sort(rng.choice(len(split), min(n_queries, len(split)), replace=False))
    recall_user = None
    k = min(k, len(vectors))
    if len(users):
        history = split.history[torch.from_numpy(users)].to(item_emb.device)
        user_q = model.user_embeddings(history, item_emb).float().cpu().numpy()  # (U, D)
        exact = model.rank(history, k, item_emb=item_emb).cpu().numpy()  # (U, k) item indices
        recall_user = ann_recall(search(built.index, user_q, k)[1], exact, k)
    item_q = vectors[np.sort(rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False))]
    return {
        "k": k,
        "reference": "users: the model's full ranking (TwoTowerModule.rank); items: exact inner-product "
        "search (faiss.contrib.exhaustive_search.knn)",
        "queries": "user: test-split histories through the user tower; item: catalogue items (each finds itself)",
        "user_queries": len(users),
        "item_queries": len(item_q),
        "recall_user": recall_user,
        "recall_item": measure_recall(built.index, vectors, ids, item_q, k),
    }


def tuning_queries(
    model: TwoTowerModule,
    dm: SequenceDataModule,
    item_emb: torch.Tensor,
    vectors: np.ndarray,
    ids: np.ndarray,
    k: int,
    n_queries: int,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The queries the search setting is tuned on, each with its exact top-k ids.

    ``user``: validation histories through the user tower, against the model's full ranking
    (:meth:`TwoTowerModule.rank`); ``item``: catalogue items, against exact inner-product search. The
    recall check (:func:`recall_check`) then measures the chosen setting on test histories.
    """
    rng = np.random.default_rng(seed + 1)  # another draw than the recall check's
    split = dm.val_split if len(dm.val_split) else dm.test_split
    k = min(k, len(vectors))
    sets = {}
    users = np.sort(rng.choice(len(split), min(n_queries, len(split)), replace=False))
    if len(users):
        history = split.history[torch.from_numpy(users)].to(item_emb.device)
        user_q = model.user_embeddings(history, item_emb).float().cpu().numpy()  # (U, D)
        sets["user"] = (user_q, model.rank(history, k, item_emb=item_emb).cpu().numpy())  # (U, k) item indices
    item_q = vectors[np.sort(rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False))]
    sets["item"] = (item_q, exact_search(vectors, ids, item_q, k))
    return sets


def _warn_low_recall(recall: dict, warn_below: float, index_name: str, target: float | None = None) -> None:
    """Warn when the recall check (test histories, catalogue items) comes out below ``warn_below``, or
    below the ``target`` recall the operating point reached on its own tuning queries."""
    worst = min(r for r in (recall["recall_user"], recall["recall_item"]) if r is not None)
    if worst < warn_below:
        log.warning(
            "recall@%d against exact search is %.3f (< %.2f): raise efSearch / nprobe in configs/index/%s.yaml, "
            "or use index=flat (exact) for a catalogue this size",
            recall["k"], worst, warn_below, index_name,
        )  # fmt: skip
    elif target is not None and worst < target:
        # The setting was the cheapest to reach the target on the tuning queries, so it can fall short on
        # other queries (seen: 0.955 tuned, 0.917 checked, with 200 queries each).
        log.warning(
            "recall@%d on the check's queries is %.3f, below the target_recall %g its search setting reached "
            "on the tuning queries: export with more recall.queries, or a higher index.target_recall",
            recall["k"], worst, target,
        )  # fmt: skip


def _manifest(
    ckpt_path: Path,
    model: TwoTowerModule,
    dm: SequenceDataModule,
    spec: IndexSpec,
    built: BuiltIndex,
    items: pd.DataFrame,
    recall: dict,
    config: dict | None,
    timings: dict[str, float],
    tuned: Tuned | None = None,
) -> dict:
    """The manifest of an export, before :func:`~towerrec.retrieval.folder.seal` adds the file hashes."""
    image_cache = Path(dm.processed_dir).resolve() / "images.npy"
    model_config = model.hparams["config"]
    return {
        "format": FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": str(ckpt_path), "sha256": file_sha256(ckpt_path)},
        "data": {
            "name": dm.manifest.get("name"),
            "processed_dir": str(Path(dm.processed_dir).resolve()),
            "config_hash": dm.manifest.get("config_hash"),
        },
        "model": {"dim": int(model_config["dim"]), "max_history": int(dm.max_history)},
        "config": config if config is not None else {"index": asdict(spec)},
        "index": {
            "name": spec.name,
            "spec": asdict(built.spec),
            "device": built.device,
            "device_reason": built.device_reason,
            "choice": built.spec.reason or f"configs/index/{spec.name}.yaml: {spec.factory}",
        },
        "factory": built.factory,
        "metric": METRIC_NAME,
        "dim": int(built.index.d),
        "count": len(items),
        "cold_count": int(items["is_cold"].sum()),
        **{k: round(v, 3) for k, v in timings.items()},
        "train_seconds": round(built.train_seconds, 3),
        "build_seconds": round(built.build_seconds, 3),
        "recall": recall,
        # The search setting load_export applies (chosen for index.target_recall, else the config's).
        "operating_point": tuned.to_manifest() if tuned is not None else {"params": built.spec.search_params},
        "image_cache": str(image_cache) if image_cache.exists() else None,
        "versions": {
            "faiss": faiss.__version__,
            "torch": torch.__version__,
            "towerrec": towerrec.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def write_export(
    out: Path,
    index: faiss.Index,
    items: pd.DataFrame,
    vectors: np.ndarray,
    manifest: dict,
    overwrite: bool = False,
    customers: CustomerExport | None = None,
) -> Path:
    """Write an export folder atomically: the CPU ``index``, the item table, the ``(N, D)`` unit-norm
    ``vectors`` aligned with its rows, and ``manifest`` sealed with every file's size and sha256.
    ``customers`` (``users=true``) adds the customer files, listed in ``manifest["customers"]``.

    Raises:
        ExportError: when ``out`` exists and ``overwrite`` is off.
    """
    try:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            faiss.write_index(index, str(tmp / INDEX_FILE))
            items.to_parquet(tmp / ITEMS_FILE, index=False)
            np.save(tmp / EMBEDDINGS_FILE, vectors)
            manifest = {**manifest, "customer_data": customers is not None}
            if customers is not None:
                manifest["customers"] = customers.write(tmp)
            seal(manifest, tmp)
    except FileExistsError as err:
        raise ExportError(str(err)) from None
    return out


@dataclass
class CustomerExport:
    """The customers of an export (``users=true``): embeddings, their index, table and past purchases."""

    built: BuiltIndex
    table: pd.DataFrame  # user_idx, customer_id, n_purchases, segments; row r = vectors[r]
    vectors: np.ndarray  # (C, D) unit-norm user-tower embeddings
    purchases: Callable[[], Iterator[pd.DataFrame]]  # chunks of distinct (user_idx, item_idx) up to the cut-off
    info: dict  # manifest["customers"], before the file hashes

    def write(self, folder: Path) -> dict:
        """Write the customer files into ``folder``; returns ``manifest["customers"]`` with their hashes.

        The purchases are written chunk by chunk (one parquet row group each), never held whole.
        """
        index = self.built.index
        if self.built.device == "gpu":
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(folder / CUSTOMER_INDEX_FILE))
        self.table.to_parquet(folder / CUSTOMERS_FILE, index=False)
        np.save(folder / CUSTOMER_EMBEDDINGS_FILE, self.vectors)
        schema = pa.schema([("user_idx", pa.int64()), ("item_idx", pa.int64())])
        with pq.ParquetWriter(folder / PURCHASES_FILE, schema) as out:
            for chunk in self.purchases():
                out.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False))
        return {**self.info, "files": folder_files(folder, list(CUSTOMER_FILES))}


def customer_histories(interactions: pd.DataFrame, user_idx: np.ndarray, max_history: int) -> np.ndarray:
    """``(C, max_history)`` left-padded histories (most recent last) of ``user_idx`` from
    ``interactions`` sorted by user, then time (as the processed table is)."""
    u = interactions["user_idx"].to_numpy()
    items = interactions["item_idx"].to_numpy()
    row_of = np.full(int(max(u.max(initial=0), user_idx.max(initial=0))) + 1, -1, dtype=np.int64)
    row_of[user_idx] = np.arange(len(user_idx))
    keep = row_of[u] >= 0
    u, items = u[keep], items[keep]
    counts = np.bincount(u, minlength=len(row_of))
    ends = np.cumsum(counts)  # one past each user's last row
    from_end = ends[u] - 1 - np.arange(len(u))  # 0 = the user's most recent purchase
    last = from_end < max_history
    out = np.zeros((len(user_idx), max_history), dtype=np.int64)
    out[row_of[u[last]], max_history - 1 - from_end[last]] = items[last]
    return out


def customer_table(users: pd.DataFrame, n_purchases: np.ndarray) -> pd.DataFrame:
    """The exported customer table: ids, purchases up to the cut-off and the prepared segments."""
    cols = [c for c in ("lifecycle", "rfm_segment", "rfm_r", "rfm_f", "rfm_m") if c in users]
    out = pd.DataFrame(
        {"user_idx": users["user_idx"].astype(np.int64).to_numpy(), "customer_id": users["user_id"].astype(str).to_numpy()}
    )
    out["n_purchases"] = n_purchases.astype(np.int64)
    for c in cols:
        out[c] = users[c].to_numpy()
    return out


def _purchase_chunks(seq: Sequences, user_idx: np.ndarray, chunk_users: int) -> Iterator[pd.DataFrame]:
    """Distinct ``(user_idx, item_idx)`` pairs of ``user_idx``'s whole sequences, in order of first
    purchase within each user, ``chunk_users`` users at a time (read from the memory maps)."""
    start, end = seq.start(), seq.end_of(tuple(SPLIT_CODES))
    for c in range(0, len(user_idx), chunk_users):
        u = user_idx[c : c + chunk_users]
        row, item = distinct_pairs(seq.items, start[u], end[u])
        yield pd.DataFrame({"user_idx": u[row].astype(np.int64), "item_idx": item})


def _latest_timestamp(processed_dir: Path) -> str | None:
    """The latest interaction's time (the data's cut-off), streamed from ``interactions.parquet``."""
    latest = None
    pf = pq.ParquetFile(Path(processed_dir) / "interactions.parquet")
    for batch in pf.iter_batches(batch_size=1 << 20, columns=["timestamp"]):
        top = pc.max(batch.column(0)).as_py()
        if top is not None and (latest is None or top > latest):
            latest = top
    return str(pd.Timestamp(latest)) if latest is not None else None


@torch.no_grad()
def export_customers(
    model: TwoTowerModule,
    dm: SequenceDataModule,
    spec: IndexSpec,
    item_emb: torch.Tensor,
    item_vectors: np.ndarray,
    recall_k: int,
    n_queries: int,
    seed: int,
    chunk_size: int = 1024,
    chunk_users: int = 65536,
) -> CustomerExport:
    """Embed every customer with a purchase from their whole history (every split: up to the data's
    cut-off) through :meth:`TwoTowerModule.user_embeddings`, the function validation ranks with, and
    build ``spec`` over them; recall@k against exact search for item queries (the audience query).

    Histories are cut from the memory-mapped sequences ``chunk_users`` customers at a time, and the
    past purchases are written the same way (:class:`CustomerExport`): only the ``(C, D)`` vectors
    (which the index is built over) and per-customer columns are held whole.
    """
    seq = dm.sequences
    start, end = seq.start(), seq.end_of(tuple(SPLIT_CODES))
    users = dm.users.sort_values("user_idx")
    all_idx = users["user_idx"].to_numpy().astype(np.int64)
    n_purchases = np.zeros(len(all_idx), dtype=np.int64)
    known = all_idx <= seq.n_users
    n_purchases[known] = np.asarray(end)[all_idx[known]] - np.asarray(start)[all_idx[known]]
    users, n_purchases = users[n_purchases > 0], n_purchases[n_purchases > 0]
    user_idx = users["user_idx"].to_numpy().astype(np.int64)
    t0 = time.perf_counter()
    vectors = np.zeros((len(user_idx), item_emb.shape[1]), dtype=np.float32)
    for c in range(0, len(user_idx), chunk_users):
        u = user_idx[c : c + chunk_users]
        history = torch.from_numpy(last_items(seq.items, start[u], end[u], int(dm.max_history)))
        for i in range(0, len(u), chunk_size):
            emb = model.user_embeddings(history[i : i + chunk_size].to(item_emb.device), item_emb)
            vectors[c + i : c + i + len(emb)] = emb.float().cpu().numpy()
    vectors = normalized(vectors)
    embed_seconds = time.perf_counter() - t0
    built = build_index(spec, vectors, user_idx, keep_on_device=True)
    k = min(recall_k, len(vectors))
    rng = np.random.default_rng(seed)
    queries = item_vectors[np.sort(rng.choice(len(item_vectors), min(n_queries, len(item_vectors)), replace=False))]
    recall = measure_recall(built.index, vectors, user_idx, queries, k)
    log.info("customers: %d embedded, %s, recall@%d vs exact %.4f", len(vectors), built.factory, k, recall)
    info = {
        "count": len(vectors),
        "without_history": int((dm.users["user_idx"].nunique()) - len(vectors)),
        "history": "every purchase up to the data's cut-off (all splits), the last max_history of them",
        "cutoff": _latest_timestamp(dm.processed_dir) if len(vectors) else None,
        "factory": built.factory,
        "metric": METRIC_NAME,
        "search_params": built.spec.search_params,
        "device": built.device,
        "embed_seconds": round(embed_seconds, 3),
        "build_seconds": round(built.build_seconds, 3),
        "recall": {
            "k": k,
            "reference": "exact inner-product search (faiss.contrib.exhaustive_search.knn)",
            "queries": "catalogue items (item -> customers, the audience query)",
            "item_queries": len(queries),
            "recall_item": recall,
        },
        "segments": "as prepared (users.parquet): RFM and lifecycle from the training window",
    }
    purchases = functools.partial(_purchase_chunks, seq, user_idx, chunk_users)
    return CustomerExport(built, customer_table(users, n_purchases), vectors, purchases, info)


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
    force: bool = False,
    users: bool = False,
) -> Path:
    """Embed the catalogue with ``ckpt_path``, build ``spec`` and write the export folder.

    Long because it is the export's straight-line sequence (embed, build, tune, check, customers,
    manifest, write) and its 13 documented arguments; it is left whole while the export's memory work
    changes this module.

    Args:
        ckpt_path: a ``.ckpt`` of a :class:`TwoTowerModule`.
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
        force: export a checkpoint trained on processed data other than ``processed_dir``'s.
        users: also export the customers (:func:`export_customers`); nothing about customers is
            written without it.

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
    model, dm = load_trained(ckpt_path, processed_dir=processed_dir, device=device, force=force)
    log.info("loaded %s and its data (%d users) in %.1fs", ckpt_path.name, dm.sequences.n_users, time.perf_counter() - t_start)
    items = item_table(dm.items)
    n = len(items)
    if not np.array_equal(items["item_idx"].to_numpy(), np.arange(1, n + 1)):
        raise ExportError(f"{dm.processed_dir}: item_idx must run 1..{n} (row 0 is padding)")

    # Every catalogue item, never-bought ones too: the tower embeds cold items from image and content.
    t0 = time.perf_counter()
    item_emb = model.item_tower.embed_all()  # (N+1, D), row 0 padding
    vectors = normalized(item_emb[1:].float().cpu().numpy())  # (N, D)
    ids = items["item_idx"].to_numpy()
    embed_seconds = time.perf_counter() - t0
    log.info("embedded %d items in %.1fs", n, embed_seconds)
    # Built on a GPU where one is used, then tuned, checked and saved as the CPU index the loaders read.
    built = build_index(spec, vectors, ids)
    log.info("built %s over %d items in %.1fs on %s", built.factory, n, built.build_seconds, built.device)
    tuned = None
    if spec.target_recall is not None:
        t0 = time.perf_counter()
        sets = tuning_queries(model, dm, item_emb, vectors, ids, recall_k, n_queries, seed)
        try:
            what = f"index={spec.name} ({built.factory})"
            built, tuned = tune_built(built, vectors, ids, sets, min(recall_k, n), spec.target_recall, what)
        except TuneError as err:
            raise ExportError(str(err)) from None
        if built.spec.reason:
            log.info("%s", built.spec.reason)
        log.info(
            "operating point %s: recall@%d %s at %.0f queries/s (1 thread), %d settings measured in %.1fs",
            tuned.chosen.params, tuned.k, tuned.chosen.recall, tuned.chosen.queries_per_s,
            len(tuned.explored), time.perf_counter() - t0,
        )  # fmt: skip
    recall = recall_check(model, dm, built, item_emb, vectors, ids, recall_k, n_queries, seed)
    log.info("recall@%d vs exact: users %s, items %.4f", recall["k"], recall["recall_user"], recall["recall_item"])
    _warn_low_recall(recall, warn_below, spec.name, spec.target_recall)
    index = built.index

    customers = None
    if users:
        customers = export_customers(model, dm, spec, item_emb, vectors, recall_k, n_queries, seed)
        if customers.info["recall"]["recall_item"] < warn_below:
            log.warning("customer index recall@%d against exact search is %.3f (< %.2f)",
                        customers.info["recall"]["k"], customers.info["recall"]["recall_item"], warn_below)  # fmt: skip

    manifest = _manifest(
        ckpt_path, model, dm, spec, built, items, recall, config, {"embed_seconds": embed_seconds}, tuned
    )
    manifest["seconds"] = round(time.perf_counter() - t_start, 3)
    write_export(out, index, items, vectors, manifest, overwrite, customers)
    log.info("export written to %s", out)
    return out
