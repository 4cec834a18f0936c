"""Paired comparisons of two scorers over the same users: mean difference, interval and p-value.

Two models scored on the same split rank for the same users, so their per-user metrics are paired. The
difference ``d_u = a_u - b_u`` of each user carries the comparison: its mean is the effect, a
percentile bootstrap over users (:func:`~towerrec.ranking.bootstrap_interval` of ``d``) its
95% interval, and a sign-flip test its p-value. Overlapping per-model intervals do not show that two
models are equal; the paired test is the tool for that question.

The sign-flip test is the permutation test of paired data: under the null hypothesis that the two
models are exchangeable for every user, each ``d_u`` is as likely to be ``-d_u``. The p-value is the
share of sign patterns whose ``|mean|`` reaches the observed one: exact (every ``2**n`` pattern) when
that is no more than ``n_flips``, else ``(1 + hits) / (1 + n_flips)`` over random patterns from a fixed
seed, so the same inputs give the same p-value.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from towerrec.evaluation.per_user import pair_keys
from towerrec.ranking import bootstrap_interval

#: Random sign patterns of the sign-flip test and bootstrap resamples of the interval.
N_FLIPS = 10_000
N_RESAMPLES = 10_000
#: The level at which a difference is called better or worse.
ALPHA = 0.05


def _values(x: Tensor | np.ndarray | list[float]) -> Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float64))


def sign_flip_p_value(diff: Tensor | np.ndarray, n_flips: int = N_FLIPS, seed: int = 0) -> float:
    """Two-sided paired sign-flip (permutation) p-value of ``mean(diff) != 0``; NaN entries left out.

    Args:
        diff: ``(n,)`` per-user differences.
        n_flips: random sign patterns; with ``2**n <= n_flips`` every pattern is enumerated instead.
        seed: seed of the random patterns.

    Returns:
        The p-value in ``(0, 1]``; 1.0 when every difference is 0; NaN without users.
    """
    d = _values(diff)
    d = d[~torch.isnan(d)]
    n = len(d)
    if n == 0:
        return math.nan
    observed = d.mean().abs().item()
    tol = 1e-12 * max(1.0, observed)  # equal means may differ in the last bits by summation order
    if n < 63 and 2**n <= n_flips:
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=torch.float64)  # (2**n, n)
        return ((signs @ d).abs() / n >= observed - tol).double().mean().item()
    g = torch.Generator().manual_seed(seed)
    block = max(1, 2**22 // n)  # sign patterns per block, so memory stays bounded
    hits = 0
    for start in range(0, n_flips, block):
        signs = torch.randint(0, 2, (min(block, n_flips - start), n), generator=g).double().mul_(2).sub_(1)
        hits += int(((signs @ d).abs() / n >= observed - tol).sum().item())
    return (1 + hits) / (1 + n_flips)


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over the users both have a value for (see :func:`paired_difference`)."""

    users: int
    mean_a: float
    mean_b: float
    mean_diff: float
    lo: float
    hi: float
    p_value: float

    def verdict(self, alpha: float = ALPHA) -> str:
        """``better`` (a above b) or ``worse`` when ``p < alpha``, else ``not distinguishable``."""
        if self.p_value < alpha and self.mean_diff > 0:
            return "better"
        if self.p_value < alpha and self.mean_diff < 0:
            return "worse"
        return "not distinguishable"

    def as_dict(self, alpha: float = ALPHA) -> dict:
        return {**asdict(self), "verdict": self.verdict(alpha)}


def paired_difference(
    a: Tensor | np.ndarray,
    b: Tensor | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    n_flips: int = N_FLIPS,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Mean of ``a - b`` per user, its paired-bootstrap interval and its sign-flip p-value.

    Args:
        a, b: ``(n,)`` per-user values of two scorers for the same users in the same order; a user with
            NaN in either (no target in the slice) is left out of both.
        n_resamples: bootstrap resamples of the users.
        n_flips: sign patterns of :func:`sign_flip_p_value`.
        level: interval level.
        seed: seed of both the bootstrap and the sign flips.
    """
    a, b = _values(a), _values(b)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"a and b must be 1-D and aligned per user, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    keep = ~torch.isnan(a) & ~torch.isnan(b)
    a, b = a[keep], b[keep]
    d = a - b
    if len(d) == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    lo, hi = bootstrap_interval(d, n_resamples=n_resamples, level=level, seed=seed)
    return PairedDifference(
        users=len(d),
        mean_a=a.mean().item(),
        mean_b=b.mean().item(),
        mean_diff=d.mean().item(),
        lo=lo,
        hi=hi,
        p_value=sign_flip_p_value(d, n_flips=n_flips, seed=seed),
    )


def compare_per_user(
    a: pd.DataFrame,
    b: pd.DataFrame,
    slices: tuple[str, ...] | list[str],
    metrics: list[str] | None = None,
    alpha: float = ALPHA,
    **kwargs,
) -> pd.DataFrame:
    """Paired differences ``a - b`` of two per-user tables, one row per (slice, metric).

    Args:
        a, b: per-user tables (``user_idx`` and ``<slice>/<metric>@k`` columns), as towerrec-train and
            towerrec-eval write them; users are matched on ``user_idx`` (and ``fold`` in a rolling
            backtest) and only those in both count.
        slices: slices to compare, e.g. ``("all", "warm_items", "cold_items")``.
        metrics: ``metric@k`` names; default every one both tables have.
        alpha: the level of the ``verdict`` column.
        kwargs: passed to :func:`paired_difference`.

    Returns:
        Columns ``slice``, ``metric`` and those of :class:`PairedDifference` plus ``verdict``.
    """
    keys = pair_keys(a)
    if keys != pair_keys(b):
        raise ValueError("one per-user table has a fold column (a rolling backtest) and the other not: not the same split")
    joined = a.merge(b, on=keys, suffixes=("/a", "/b"), validate="one_to_one")
    rows = []
    for sl in slices:
        common = [c.split("/", 1)[1] for c in a if c.startswith(f"{sl}/") and c in b]
        for metric in common if metrics is None else [m for m in metrics if m in common]:
            column = f"{sl}/{metric}"
            diff = paired_difference(joined[f"{column}/a"].to_numpy(), joined[f"{column}/b"].to_numpy(), **kwargs)
            rows.append({"slice": sl, "metric": metric, **diff.as_dict(alpha)})
    return pd.DataFrame(rows, columns=["slice", "metric", *PairedDifference.__dataclass_fields__, "verdict"])
