"""Slice one per-user ranking result: warm/cold targets, history length, customer segments.

Every scorer (the two-tower model, each baseline, a FAISS index) produces top-k item lists for the
users of an :class:`~towerrec.data.datamodule.EvalSplit`; :func:`evaluate_split` turns them into the
same table. Slices are masks over one result, computed by :mod:`towerrec.ranking`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from towerrec.data.features import ItemFeatures
from towerrec.fileio import markdown_table
from towerrec.ranking import (
    PAD,
    aggregate,
    bootstrap_interval,
    coverage_at_k,
    intra_list_diversity_at_k,
    novelty_at_k,
    popularity_percentile_at_k,
    rank_metrics,
)

#: The item slices every result has; each also gets a bootstrap interval of its recall and NDCG.
ITEM_SLICES = ("all", "warm_items", "cold_items")
#: Metrics given an interval, as ``<metric>_lo@k`` and ``<metric>_hi@k`` (95%, over users).
INTERVAL_METRICS = ("recall", "ndcg")

#: History-length buckets (inclusive bounds) for user slices.
HISTORY_BUCKETS: list[tuple[str, int, float]] = [("0", 0, 0), ("1", 1, 1), ("2-4", 2, 4), ("5-9", 5, 9), ("10+", 10, math.inf)]


#: Users whose targets are cut from the memory maps at once when a split is scored.
CHUNK_USERS = 65536


def item_slices_per_user(
    topk: Tensor, split, is_cold: Tensor, ks: list[int], chunk_users: int = CHUNK_USERS
) -> dict[str, dict[str, Tensor]]:
    """Per-user metrics of :data:`ITEM_SLICES`: ``{slice: {metric@k: (U,) values}}``, NaN for users
    without a target in the slice (a warm-items value counts the user's warm targets only).

    The split's targets are cut ``chunk_users`` users at a time; each user's values do not depend on it.
    """
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be positive, got {chunk_users}")
    topk, cold = topk.cpu(), is_cold.cpu()
    parts: dict[str, list[dict[str, Tensor]]] = {sl: [] for sl in ITEM_SLICES}
    for lo in range(0, len(split), chunk_users):
        top, targets = topk[lo : lo + chunk_users], split.targets[lo : lo + chunk_users]
        real = targets != PAD
        cold_t = cold[targets] & real
        parts["all"].append(rank_metrics(top, targets, ks))
        parts["warm_items"].append(rank_metrics(top, targets, ks, target_mask=real & ~cold_t))
        parts["cold_items"].append(rank_metrics(top, targets, ks, target_mask=cold_t))
    if not len(split):  # the metric names of an empty result
        empty = torch.zeros(0, 1, dtype=torch.long)
        return {sl: rank_metrics(topk, empty, ks) for sl in ITEM_SLICES}
    return {sl: {m: torch.cat([p[m] for p in ps]) for m in ps[0]} for sl, ps in parts.items()}


def per_user_frame(per_slice: dict[str, dict[str, Tensor]], user_idx) -> pd.DataFrame:
    """One row per evaluated user: ``user_idx`` and a ``<slice>/<metric>@k`` column per value."""
    columns = {"user_idx": np.asarray(user_idx)}
    for sl, per_user in per_slice.items():
        for name, values in per_user.items():
            columns[f"{sl}/{name}"] = values.double().cpu().numpy()
    return pd.DataFrame(columns)


def slice_values(per_user: pd.DataFrame, sl: str) -> dict[str, Tensor]:
    """One item slice of a :func:`per_user_frame`, back as ``{metric@k: (U,) float64 tensor}``."""
    prefix = f"{sl}/"
    return {
        col.removeprefix(prefix): torch.tensor(per_user[col].to_numpy(dtype="float64"))
        for col in per_user
        if col.startswith(prefix)
    }


def frame_metrics(per_user: pd.DataFrame, ks: list[int]) -> dict[str, dict[str, float]]:
    """Means and 95% bootstrap intervals of the item slices of a per-user frame, over its rows
    (users, or the (fold, user) pairs of a backtest)."""
    out: dict[str, dict[str, float]] = {}
    for sl in ITEM_SLICES:
        values = slice_values(per_user, sl)
        if values:
            out[sl] = {**aggregate(values), **intervals(values, ks)}
    return out


def intervals(per_user: dict[str, Tensor], ks: list[int]) -> dict[str, float]:
    """``<metric>_lo@k`` and ``<metric>_hi@k``: 95% bootstrap intervals over users of :data:`INTERVAL_METRICS`."""
    out: dict[str, float] = {}
    for m in INTERVAL_METRICS:
        for k in ks:
            if f"{m}@{k}" in per_user:
                out[f"{m}_lo@{k}"], out[f"{m}_hi@{k}"] = bootstrap_interval(per_user[f"{m}@{k}"])
    return out


def evaluate_split(
    topk: Tensor,
    split,
    is_cold: Tensor,
    train_users: Tensor,
    ks: list[int],
    segments: bool = True,
    per_slice: dict[str, dict[str, Tensor]] | None = None,
    chunk_users: int = CHUNK_USERS,
) -> dict[str, dict[str, float]]:
    """Metrics of one ranking result, by slice.

    Args:
        topk: ``(U, K)`` recommended items for the users of ``split``, best first.
        split: the :class:`EvalSplit` (targets, history lengths, user segments).
        is_cold: ``(N+1,)`` bool, True for items without a training interaction.
        train_users: ``(N+1,)`` distinct training users per item (popularity and novelty).
        ks: cut-offs.
        segments: add history-length, lifecycle and RFM user slices.
        per_slice: :func:`item_slices_per_user` of this result, when the caller already has it.
        chunk_users: users whose targets are cut at once (the result does not depend on it).

    Returns:
        ``{slice: {metric@k: value, "users": n}}`` with slices ``all``, ``warm_items``,
        ``cold_items`` (each with 95% bootstrap intervals ``recall_lo@k``, ``recall_hi@k``,
        ``ndcg_lo@k``, ``ndcg_hi@k`` over users) and, with ``segments``, ``history=…``, ``lifecycle=…``, ``R=…``, ``F=…``, ``M=…``.
        ``all`` also has ``coverage@k``, ``pop_percentile@k`` and ``novelty@k``.
    """
    topk = topk.cpu()
    if per_slice is None:
        per_slice = item_slices_per_user(topk, split, is_cold, ks, chunk_users)
    out: dict[str, dict[str, float]] = {sl: {**aggregate(v), **intervals(v, ks)} for sl, v in per_slice.items()}
    per_user = per_slice["all"]
    n_items = len(is_cold)
    pop = train_users.cpu().float()
    n_train_users = max(int(pop.max().item()), split.n_train_users, 1)
    for k in ks:
        out["all"][f"coverage@{k}"] = coverage_at_k(topk, n_items, k)
        out["all"][f"pop_percentile@{k}"] = popularity_percentile_at_k(topk, pop, k)
        out["all"][f"novelty@{k}"] = novelty_at_k(topk, pop, n_train_users, k)
    if not segments:
        return out
    hlen = split.history_len.cpu()
    for name, lo, hi in HISTORY_BUCKETS:
        mask = (hlen >= lo) & (hlen <= hi)
        if mask.any():
            out[f"history={name}"] = aggregate(per_user, mask)
    users = split.users
    for col, label in (("lifecycle", "lifecycle"), ("rfm_r", "R"), ("rfm_f", "F"), ("rfm_m", "M")):
        if col not in users:
            continue
        values = users[col].to_numpy()
        for v in sorted({x for x in values if x == x}, key=str):
            mask = torch.from_numpy(np.asarray(values == v))
            out[f"{label}={v}"] = aggregate(per_user, mask)
    return out


def score_split(
    topk: Tensor, split, features: ItemFeatures, ks: list[int], segments: bool = True, chunk_users: int = CHUNK_USERS
) -> tuple[dict[str, dict[str, float]], pd.DataFrame]:
    """Metrics of one ranking of ``split`` by slice (:func:`evaluate_split`), and each user's values.

    Every scorer reports through here: ``towerrec-train``'s test of the selected checkpoint,
    ``towerrec-eval``'s models and baselines.

    Returns:
        ``(results, per_user)``: ``{slice: {metric@k: value}}`` and :func:`per_user_frame` of the item
        slices. The split's targets are read ``chunk_users`` users at a time. With images, ``all``
        also has ``image_diversity@k``: one minus the mean cosine between the image features
        (:func:`~towerrec.data.features.image_features`) of the top-k items.
    """
    per_slice = item_slices_per_user(topk, split, features.is_cold, ks, chunk_users)
    results = evaluate_split(topk, split, features.is_cold, features.train_users, ks, segments, per_slice)
    if features.has_image.any() and len(topk):
        # Beyond accuracy: how different the recommended items look (8x8 thumbnails, colour histograms).
        for k in ks:
            if k >= 2:
                results["all"][f"image_diversity@{k}"] = intra_list_diversity_at_k(topk, features.looks, k)
    return results, per_user_frame(per_slice, split.user_idx.cpu().numpy())


def format_table(results: dict[str, dict[str, dict[str, float]]], metrics: list[str]) -> str:
    """A markdown table: one row per (model, slice), one column per metric."""
    rows = [
        {"model": model, "slice": sl, "users": vals.get("users", ""), **{m: vals.get(m, math.nan) for m in metrics}}
        for model, slices in results.items()
        for sl, vals in slices.items()
    ]
    return markdown_table(pd.DataFrame(rows, columns=["model", "slice", "users", *metrics]))
