"""Slice one per-user ranking result: warm/cold targets, history length, customer segments.

Every scorer (the two-tower model, each baseline, a FAISS index) produces top-k item lists for the
users of an :class:`~towerrec.data.datamodule.EvalSplit`; :func:`evaluate_split` turns them into the
same table. Slices are masks over one result, computed by :mod:`towerrec.evaluation.metrics`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from towerrec.evaluation.metrics import (
    PAD,
    aggregate,
    coverage_at_k,
    novelty_at_k,
    popularity_percentile_at_k,
    rank_metrics,
)

#: History-length buckets (inclusive bounds) for user slices.
HISTORY_BUCKETS: list[tuple[str, int, float]] = [("0", 0, 0), ("1", 1, 1), ("2-4", 2, 4), ("5-9", 5, 9), ("10+", 10, math.inf)]


def seen_pairs(seen: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """(user_row, item) pairs from a right-padded ``(U, S)`` seen-items matrix."""
    if seen is None:
        return None
    rows, cols = (seen != PAD).nonzero(as_tuple=True)
    return rows, seen[rows, cols]


def evaluate_split(
    topk: Tensor,
    split,
    is_cold: Tensor,
    train_users: Tensor,
    ks: list[int],
    segments: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics of one ranking result, by slice.

    Args:
        topk: ``(U, K)`` recommended items for the users of ``split``, best first.
        split: the :class:`EvalSplit` (targets, history lengths, user segments).
        is_cold: ``(N+1,)`` bool, True for items without a training interaction.
        train_users: ``(N+1,)`` distinct training users per item (popularity and novelty).
        ks: cut-offs.
        segments: add history-length, lifecycle and RFM user slices.

    Returns:
        ``{slice: {metric@k: value, "users": n}}`` with slices ``all``, ``warm_items``,
        ``cold_items`` and, with ``segments``, ``history=…``, ``lifecycle=…``, ``R=…``, ``F=…``, ``M=…``.
        ``all`` also has ``coverage@k``, ``pop_percentile@k`` and ``novelty@k``.
    """
    topk = topk.cpu()
    targets = split.targets.cpu()
    real = targets != PAD
    cold_t = is_cold.cpu()[targets] & real
    per_user = rank_metrics(topk, targets, ks)
    out: dict[str, dict[str, float]] = {"all": aggregate(per_user)}
    out["warm_items"] = aggregate(rank_metrics(topk, targets, ks, target_mask=real & ~cold_t))
    out["cold_items"] = aggregate(rank_metrics(topk, targets, ks, target_mask=cold_t))
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


def format_table(results: dict[str, dict[str, dict[str, float]]], metrics: list[str]) -> str:
    """A markdown table: one row per (model, slice), one column per metric."""
    lines = ["| model | slice | users | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 3)]
    for model, slices in results.items():
        for sl, vals in slices.items():
            cells = [f"{vals[m]:.4f}" if m in vals and vals[m] == vals[m] else "–" for m in metrics]
            lines.append(f"| {model} | {sl} | {vals.get('users', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
