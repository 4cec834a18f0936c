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

Any number of processes may prepare (or train on) one folder at once: the builder holds a file lock
beside it (``<processed_dir>.lock``), writes into a temporary folder of its own and renames it into
place when complete, so a crash or kill leaves the previous complete folder or none. The others wait
for the lock and then use what it built.
"""

from __future__ import annotations

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

import filelock
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from towerrec.data.image_cache import build_image_cache
from towerrec.data.manifest import MANIFEST, read_manifest, verify_processed
from towerrec.data.schema import DataError, RawDataset
from towerrec.data.sequences import write_sequences
from towerrec.data.settings import PREPARE_VERSION, PrepareSettings, SplitSettings, config_hash, rolling_cuts
from towerrec.fileio import atomic_folder, folder_files, tree_fingerprint, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
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
        if stale.is_dir() and (".tmp-" in stale.name or ".old-" in stale.name):
            log.info("removing %s, left by an interrupted prepare", stale)
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- splitting
def apply_filters(inter: pd.DataFrame, min_user: int, min_item: int, kcore: bool) -> tuple[pd.DataFrame, int]:
    """Drop users/items with too few interactions (once, or iterated to a k-core)."""
    before = len(inter)
    while min_user > 0 or min_item > 0:
        keep = np.ones(len(inter), dtype=bool)
        if min_user > 0:
            keep &= inter.groupby("user_id")["item_id"].transform("size").to_numpy() >= min_user
        if min_item > 0:
            keep &= inter.groupby("item_id")["user_id"].transform("size").to_numpy() >= min_item
        inter = inter[keep]
        if keep.all() or not kcore:
            break
    return inter, before - len(inter)


def assign_split(inter: pd.DataFrame, split: SplitSettings) -> tuple[np.ndarray, dict[str, Any]]:
    """Label each interaction train/val/test. ``inter`` (``user_idx``, ``timestamp``) must be sorted by user, then time.

    * ``temporal``: global cut dates. ``test_start = last day - test_days`` and
      ``val_start = test_start - val_days`` (or given explicitly). Train is strictly before
      ``val_start``, so nothing in training is after the cut.
    * ``leave_one_out``: per user, the last interaction is test and the second last validation;
      users with fewer than 3 interactions stay in training only.
    """
    method = split.method
    labels = np.zeros(len(inter), dtype=np.int8)
    info: dict[str, Any] = {"method": method}
    if method == "temporal":
        ts = inter["timestamp"]
        last_day = ts.max().normalize()
        test_start = pd.Timestamp(split.test_start or last_day - pd.Timedelta(days=split.test_days))
        val_start = pd.Timestamp(split.val_start or test_start - pd.Timedelta(days=split.val_days))
        labels[(ts >= val_start).to_numpy()] = 1
        labels[(ts >= test_start).to_numpy()] = 2
        info.update(val_start=str(val_start.date()), test_start=str(test_start.date()),
                    test_days=split.test_days, val_days=split.val_days)
    elif method == "leave_one_out":
        user = inter["user_idx"].to_numpy()
        size = inter.groupby("user_idx", sort=False)["user_idx"].transform("size").to_numpy()
        from_end = size - 1 - inter.groupby("user_idx", sort=False).cumcount().to_numpy()
        eligible = size >= 3
        labels[eligible & (from_end == 0)] = 2
        labels[eligible & (from_end == 1)] = 1
        info["users_too_short"] = int(pd.Series(size < 3).groupby(user).first().sum())
    else:
        raise DataError(f"data.split.method: unknown split method '{method}' (temporal | leave_one_out)")
    return labels, info


def fold_split(settings: PrepareSettings, interactions: pd.DataFrame) -> tuple[SplitSettings, dict[str, Any]]:
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
    full, _ = apply_filters(interactions, f.min_user_interactions, f.min_item_interactions, f.kcore)
    if len(full) == 0:
        raise DataError(f"{settings.root}: no interactions left after validation and filtering")
    last_day = pd.Timestamp(full["timestamp"].max()).normalize()
    cuts = rolling_cuts(split, last_day)[split.fold]
    if not (full["timestamp"] < cuts["val_start"]).any():
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
    info = {"fold": split.fold, "folds": split.folds, "window_days": split.window, "last_day": str(last_day.date())}
    return temporal, info


def drop_after_end(interactions: pd.DataFrame, split: SplitSettings) -> tuple[pd.DataFrame, int]:
    """The interactions before ``split.test_end`` (all without one) and how many were dropped.

    The rows are dropped before filtering, id mapping and every count, so nothing after a fold's test
    window reaches its processed folder: not training, histories, seen items nor popularity.
    """
    if split.test_end is None:
        return interactions, 0
    keep = (interactions["timestamp"] < pd.Timestamp(split.test_end)).to_numpy()
    return interactions[keep], int((~keep).sum())


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
    train: pd.DataFrame, n_users: int, train_end: pd.Timestamp, new_days: int, active_days: int
) -> pd.DataFrame:
    """RFM quantile scores (1 = low .. 3 = high) and lifecycle stage from training data only.

    Recency is days from the last training purchase to the end of training (a high R score means
    recent), frequency the number of distinct purchase days, monetary the summed spend (price x
    quantity, or the purchase count without prices). Lifecycle: ``new`` (first purchase within
    ``new_days`` of the end of training), ``active`` (last purchase within ``active_days``),
    ``lapsing`` (older), ``no_history`` (no training purchase).
    """
    idx = np.arange(1, n_users + 1)
    seg = pd.DataFrame(index=pd.Index(idx, name="user_idx"))
    if len(train) == 0:
        seg["lifecycle"] = "no_history"
        return seg.reset_index()
    spend = train["price"] * train.get("quantity", 1) if "price" in train else pd.Series(1.0, index=train.index)
    g = train.assign(_spend=spend, _day=train["timestamp"].dt.normalize()).groupby("user_idx")
    agg = pd.DataFrame({
        "first": g["timestamp"].min(),
        "last": g["timestamp"].max(),
        "frequency": g["_day"].nunique(),
        "monetary": g["_spend"].sum(),
    })
    agg["recency_days"] = (train_end - agg["last"]).dt.total_seconds() / 86400.0

    def q3(x: pd.Series, ascending: bool) -> pd.Series:
        r = x.rank(method="first", ascending=ascending)
        return pd.qcut(r, 3, labels=[1, 2, 3]).astype(int) if len(x) >= 3 else pd.Series(2, index=x.index)

    agg["rfm_r"] = q3(agg["recency_days"], ascending=False)
    agg["rfm_f"] = q3(agg["frequency"], ascending=True)
    agg["rfm_m"] = q3(agg["monetary"], ascending=True)
    days_since_first = (train_end - agg["first"]).dt.total_seconds() / 86400.0
    agg["lifecycle"] = np.where(
        days_since_first <= new_days, "new", np.where(agg["recency_days"] <= active_days, "active", "lapsing")
    )
    seg = seg.join(agg[["recency_days", "frequency", "monetary", "rfm_r", "rfm_f", "rfm_m", "lifecycle"]])
    seg["lifecycle"] = seg["lifecycle"].fillna("no_history")
    for c in ("rfm_r", "rfm_f", "rfm_m"):
        seg[c] = seg[c].fillna(0).astype(int)  # 0 = no training history
    seg["rfm_segment"] = np.where(
        seg["rfm_r"] > 0, "R" + seg["rfm_r"].astype(str) + "F" + seg["rfm_f"].astype(str) + "M" + seg["rfm_m"].astype(str), "none"
    )
    return seg.reset_index()


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
    inputs = tree_fingerprint(settings.root)
    raw: RawDataset = settings.load()
    split, fold_info = fold_split(settings, raw.interactions)
    rows, n_dropped = drop_after_end(raw.interactions, split)
    inter, n_filtered = apply_filters(
        rows,
        settings.filter.min_user_interactions,
        settings.filter.min_item_interactions,
        settings.filter.kcore,
    )
    if len(inter) == 0:
        raise DataError(f"{settings.root}: no interactions left after validation and filtering")
    items, images = _catalog(raw, inter)
    table, user_map = _interaction_table(inter, items)
    labels, split_info = assign_split(table, split)
    if split.test_end is not None:
        split_info.update(test_end=split.test_end, dropped_after_end=n_dropped)
    if fold_info:
        split_info["rolling"] = fold_info
        for name, code in (("val", 1), ("test", 2)):
            if not (labels == code).any():
                raise DataError(
                    f"data.split.folds: fold {fold_info['fold']} of {fold_info['folds']} has no {name} interactions "
                    f"({name} window from {split_info[name + '_start']}): use fewer folds or longer windows"
                )
    table["split"] = pd.Categorical.from_codes(labels, categories=list(SPLITS))
    out = settings.processed_dir
    with atomic_folder(out) as tmp:
        table.to_parquet(tmp / "interactions.parquet", index=False)
        sequences = write_sequences(tmp / "interactions.parquet", tmp)
        train = table[table["split"] == "train"]
        features = _item_files(tmp, items, train, raw, images, settings, workers)
        users = _users_table(raw, user_map, train, split_info, settings)
        users.to_parquet(tmp / "users.parquet", index=False)
        manifest = {
            "towerrec_prepare_version": PREPARE_VERSION,
            "name": settings.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build": {"id": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname()},
            "config_hash": settings.config_hash,
            "config": settings.config,
            "inputs": inputs,
            "sources": raw.sources,
            "counts": _counts(table, items, users),
            "split": split_info,
            "sequences": sequences,
            "skipped": dict(raw.skipped),
            "repaired": dict(raw.repaired),
            "filtered": {"min_interactions": int(n_filtered)},
            **features,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        manifest["files"] = folder_files(tmp)  # last: it lists every file written above
        write_json(tmp / MANIFEST, manifest)
    log.info("prepared %s in %.1f s: %s", out, manifest["seconds"], manifest["counts"])


def _catalog(raw: RawDataset, inter: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The item table in sorted raw-id order with ``item_idx`` from 1, and the images in that order."""
    items = raw.items.reset_index(drop=True)
    missing = ~inter["item_id"].isin(items["item_id"])
    if missing.any():  # sources add interacted items to the catalog; this guards custom ones
        extra = pd.DataFrame({"item_id": inter.loc[missing, "item_id"].unique()})
        items = pd.concat([items, extra], ignore_index=True)
    item_order = np.argsort(items["item_id"].to_numpy(dtype=str), kind="stable")
    items = items.iloc[item_order].reset_index(drop=True)
    images = raw.images[item_order] if raw.images is not None else None
    items.insert(0, "item_idx", np.arange(1, len(items) + 1, dtype=np.int64))
    return items, images


def _interaction_table(inter: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Interactions as integer ids, sorted by user then time, and the user id -> ``user_idx`` map."""
    # Map strings to integers once per distinct id (factorize), not once per row.
    ucode, user_ids = pd.factorize(inter["user_id"], sort=True)
    user_idx = ucode.astype(np.int64) + 1
    icode, item_uniq = pd.factorize(inter["item_id"])
    item_idx = pd.Index(items["item_id"]).get_indexer(item_uniq)[icode].astype(np.int64) + 1
    user_map = pd.Series(np.arange(1, len(user_ids) + 1), index=np.asarray(user_ids, dtype=object))
    ts = inter["timestamp"].to_numpy()
    # lexsort is stable: equal timestamps keep the source row order.
    order = np.lexsort((ts.view("i8"), user_idx))
    table = pd.DataFrame({"user_idx": user_idx[order], "item_idx": item_idx[order], "timestamp": ts[order]})
    for c in ("price", "quantity", "channel"):
        if c in inter:
            table[c] = inter[c].to_numpy()[order]
    return table, user_map


def _item_files(
    tmp: Path,
    items: pd.DataFrame,
    train: pd.DataFrame,
    raw: RawDataset,
    images: np.ndarray | None,
    settings: PrepareSettings,
    workers: int,
) -> dict[str, Any]:
    """Write ``items.parquet`` (with training counts), the categorical, text and image arrays and the
    vocabularies; return the manifest's ``images`` and ``features`` entries."""
    train_count = np.bincount(train["item_idx"].to_numpy(), minlength=len(items) + 1)[1:]
    items["train_count"] = train_count
    distinct = train.drop_duplicates(["user_idx", "item_idx"])["item_idx"].to_numpy()
    items["train_users"] = np.bincount(distinct, minlength=len(items) + 1)[1:]
    items["is_cold"] = train_count == 0

    cats, vocab = encode_categoricals(items, raw.categorical)
    np.save(tmp / "item_categorical.npy", cats)
    cols = [items[c].fillna("").astype(str).tolist() for c in raw.text]
    text = pd.Series([" ".join(parts) for parts in zip(*cols, strict=True)] if cols else [""] * len(items))
    np.save(tmp / "item_text.npy", hash_tokens(text, settings.text.buckets, settings.text.max_tokens))

    paths = items["image_path"].tolist() if "image_path" in items else [None] * len(items)
    has_image, image_counts = build_image_cache(paths, tmp / "images.npy", settings.image_size, workers, images)
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


def _users_table(
    raw: RawDataset, user_map: pd.Series, train: pd.DataFrame, split_info: dict, settings: PrepareSettings
) -> pd.DataFrame:
    """One row per user: the source's attributes, the training count and the customer segments."""
    users = pd.DataFrame({"user_idx": user_map.to_numpy(), "user_id": user_map.index.to_numpy()})
    if len(raw.users) and "user_id" in raw.users:
        users = users.merge(raw.users.drop_duplicates("user_id"), on="user_id", how="left")
    users["n_train"] = np.bincount(train["user_idx"].to_numpy(), minlength=len(users) + 1)[1:]
    temporal = split_info["method"] == "temporal"
    train_end = pd.Timestamp(split_info["val_start"]) if temporal else train["timestamp"].max()
    segs = customer_segments(train, len(users), train_end, settings.segments.new_days, settings.segments.active_days)
    return users.merge(segs, on="user_idx", how="left")


def _counts(table: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame) -> dict[str, int]:
    """The manifest's counts: users, items, interactions per split, cold and image-less items."""
    split_counts = table["split"].value_counts().reindex(list(SPLITS), fill_value=0)
    is_cold = items["is_cold"].to_numpy()
    cold_targets = {s: int(is_cold[table.loc[table["split"] == s, "item_idx"].to_numpy() - 1].sum()) for s in ("val", "test")}
    return {
        "users": len(users),
        "items": len(items),
        "interactions": len(table),
        **{s: int(split_counts[s]) for s in SPLITS},
        "cold_items": int(is_cold.sum()),
        "items_never_interacted": int((np.bincount(table["item_idx"], minlength=len(items) + 1)[1:] == 0).sum()),
        "items_with_image": int(items["has_image"].sum()),
        "val_cold_interactions": cold_targets["val"],
        "test_cold_interactions": cold_targets["test"],
    }
