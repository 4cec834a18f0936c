"""Ranking and the metric formulas, torch only: top-k over the full catalogue and the metrics on it.

It sits below ``models/``, ``retrieval/`` and ``evaluation/``, which all import it and nothing of each
other's for ranking; ``evaluation/`` adds the slices over the data, baselines, reports and statistics.

Validation, testing, the baselines and the FAISS index check all call these functions, so every number the
project reports is computed by the same code. The flow is:

1. scores for a chunk of users over *all* items (no sampled negatives), seen items and padding masked,
2. ``topk_items`` with a deterministic tie-break,
3. ``rank_metrics`` -> per-user values (one tensor per metric),
4. ``aggregate`` -> one float per metric, optionally over a user mask (segments, history-length buckets);
   ``bootstrap_interval`` -> how far that mean could move with another sample of users.

Item slices (warm and cold items) are a ``target_mask`` passed to ``rank_metrics``; user slices are a
``user_mask`` passed to ``aggregate``. Neither copies the metric code.

Item index ``PAD = 0`` is the padding item: it is never recommended ahead of a real item and never counts
as a target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PAD = 0

NEG_INF = float("-inf")

SeenPairs = tuple[Tensor, Tensor]

#: Memory for one chunk's ``(b, N)`` float32 score matrix when the caller does not set a chunk size.
CHUNK_BYTES = 256 * 2**20

#: Columns per block of :func:`_topk_lower_index`'s narrowing on the CPU, and the fewest blocks per k for
#: which it narrows: below that a plain ``torch.topk`` over the row costs about as much.
BLOCK_COLUMNS = 64
MIN_BLOCKS_PER_K = 8


def seen_pairs(seen: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """(user_row, item) pairs from a right-padded ``(U, S)`` seen-items matrix."""
    if seen is None:
        return None
    rows, cols = (seen != PAD).nonzero(as_tuple=True)
    return rows, seen[rows, cols]


def mask_seen(scores: Tensor, seen_rows: Tensor, seen_items: Tensor) -> Tensor:
    """Set ``scores[seen_rows, seen_items]`` to ``-inf`` in place and return ``scores``.

    Args:
        scores: ``(B, N)`` scores of B users over N items.
        seen_rows: ``(S,)`` row of each seen pair, in ``[0, B)``.
        seen_items: ``(S,)`` item of each seen pair, in ``[0, N)``.
    """
    scores.index_put_((seen_rows.to(scores.device), seen_items.to(scores.device)), scores.new_tensor(NEG_INF))
    return scores


@functools.lru_cache(maxsize=8)
def _tie_permutation(n_items: int) -> tuple[Tensor, Tensor]:
    """:func:`tie_order` of ``n_items`` and its inverse (position of each item in the order), on the CPU.

    Cached: evaluation asks for the same catalogue size once per batch. Callers must not modify the result.
    """
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n_items - 1, generator=g) + 1])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n_items)
    return order, inverse


def tie_order(n_items: int, device: torch.device | str = "cpu") -> Tensor:
    """A fixed pseudo-random order of ``n_items`` items (seed 0), PAD kept first.

    Scorers that give many items the same score (an ID-only model embeds every cold item alike) must
    not gain from the order of the item ids, which follows the raw ids and, on real data, carries
    information (H&M article ids grow with the product's age). Ties are broken along this order instead.
    """
    return _tie_permutation(n_items)[0].to(device, copy=True)


def chunk_rows(n_items: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Users per chunk so that one chunk's ``(b, n_items)`` float32 score matrix fits ``budget_bytes``."""
    return max(1, budget_bytes // (4 * max(n_items, 1)))


def _topk_lower_index(scores: Tensor, k: int) -> Tensor:
    """Top-k columns per row, best first, ties broken by the lower column; ``1 <= k <= N``, no NaN.

    On the CPU a long row is narrowed first: ``torch.topk`` walks every column with a selection, while
    a block maximum vectorises. The k-th largest of a row's block maxima (blocks of
    :data:`BLOCK_COLUMNS` columns) is a lower bound of its k-th largest score, since k blocks each hold
    a score at least that large; so every top-k column, and every score tied with the k-th, lies in a
    block whose maximum reaches it. Where exactly k blocks do (no tie at the bound), those blocks and
    the columns past the last whole block are ranked as :func:`_topk_lower_index_of_all` ranks a whole
    row, in ascending column order, so the result is the same; the other rows are ranked whole.
    """
    n_rows, n_items = scores.shape
    n_blocks = n_items // BLOCK_COLUMNS
    if scores.device.type != "cpu" or n_blocks < MIN_BLOCKS_PER_K * k or n_rows == 0:
        return _topk_lower_index_of_all(scores, k)
    whole = n_blocks * BLOCK_COLUMNS
    maxima = scores[:, :whole].reshape(n_rows, n_blocks, BLOCK_COLUMNS).amax(dim=2)  # NaN propagates
    bound, blocks = maxima.topk(k, dim=1)
    narrowed = (maxima >= bound[:, k - 1 :]).sum(dim=1) == k  # False also where the bound is -inf
    offsets = torch.arange(BLOCK_COLUMNS, device=scores.device)
    columns = (blocks.sort(dim=1).values.unsqueeze(2) * BLOCK_COLUMNS + offsets).view(n_rows, k * BLOCK_COLUMNS)
    if whole < n_items:
        tail = torch.arange(whole, n_items, device=scores.device)
        columns = torch.cat([columns, tail.expand(n_rows, -1)], dim=1)
    top = columns.gather(1, _topk_lower_index_of_all(scores.gather(1, columns), k))
    if not narrowed.all():
        rows = (~narrowed).nonzero().squeeze(1)
        top[rows] = _topk_lower_index_of_all(scores[rows], k)
    return top


def _topk_lower_index_of_all(scores: Tensor, k: int) -> Tensor:
    """:func:`_topk_lower_index` over every column of each row.

    One ``torch.topk`` of ``k + 1`` columns settles almost every row: when the (k+1)-th value is below
    the k-th, the chosen set is unique. Only rows where they are equal (a tie straddles the cut, or the
    row has fewer than k finite scores) are redone over their full row, keeping the tied items with the
    lowest columns. Each row is then ordered by (score descending, column ascending).
    """
    n_items = scores.shape[1]
    values, idx = scores.topk(min(k + 1, n_items), dim=1)  # (B, k+1), NaN sorts first
    if torch.isnan(values[:, :1]).any():
        raise ValueError("scores contain NaN; top-k is undefined")
    if k < n_items:
        ambiguous = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
        values, idx = values[:, :k], idx[:, :k]
        if ambiguous.numel() > 0:
            sub = scores[ambiguous]  # (A, N)
            kth = values[ambiguous, k - 1 :]  # (A, 1)
            above = sub > kth
            tied = sub == kth
            free = k - above.sum(dim=1, keepdim=True)  # places left for tied items
            chosen = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= free))
            idx[ambiguous] = chosen.nonzero()[:, 1].view(-1, k)  # row-major, so ascending per row
    idx = idx.sort(dim=1).values  # column ascending ...
    order = scores.gather(1, idx).sort(dim=1, descending=True, stable=True).indices  # ... then score
    return idx.gather(1, order)


def topk_items(scores: Tensor, k: int, shuffle_ties: bool = False) -> Tensor:
    """Top-k item indices per row, best first, ties broken by the lower item index.

    With ``shuffle_ties`` ties are broken along :func:`tie_order` instead of the item index.

    ``scores[:, PAD]`` is set to ``-inf`` in place first. ``torch.topk`` does not specify which of several
    equal scores it keeps, so the result is made deterministic: rows where a tie straddles the k-th place
    choose the tied items with the lowest indices, and every row is then ordered by (score descending,
    item index ascending). Rows with fewer than k unmasked items are filled with masked items (lowest
    indices first, which may include ``PAD``); those never count as hits.

    Args:
        scores: ``(B, N)`` float scores without NaN; modified in place.
        k: number of items to return, ``1 <= k <= N``.

    Returns:
        ``(B, k)`` long item indices.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (B, N), got shape {tuple(scores.shape)}")
    n_items = scores.shape[1]
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be in [1, {n_items}] (number of items), got {k}")
    scores[:, PAD] = NEG_INF
    if scores.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.long, device=scores.device)
    if shuffle_ties:
        order = tie_order(n_items, scores.device)
        return order[_topk_lower_index(scores[:, order], k)]
    return _topk_lower_index(scores, k)


def _exclude_index(exclude: Tensor | None, device: torch.device | str) -> Tensor | None:
    """Item indices masked for every user, from a bool mask ``(N,)`` or a long index tensor."""
    if exclude is None:
        return None
    exclude = exclude.to(device)
    if exclude.dtype == torch.bool:
        return exclude.nonzero().squeeze(1)
    return exclude.long()


def _sorted_seen(seen: SeenPairs | None, device: torch.device | str) -> SeenPairs | None:
    """The seen pairs on ``device``, sorted by user row, so each chunk's pairs are one contiguous slice."""
    if seen is None:
        return None
    seen_rows, seen_items = seen
    if seen_rows.shape != seen_items.shape or seen_rows.dim() != 1:
        raise ValueError("seen must be two 1-D tensors of equal length (user_row, item)")
    seen_rows, seen_items = seen_rows.to(device), seen_items.to(device)
    order = seen_rows.argsort(stable=True)
    return seen_rows[order], seen_items[order]


def _mask(scores: Tensor, start: int, seen: SeenPairs | None, exclude: Tensor | None) -> Tensor:
    """Set PAD, the ``exclude`` items and the chunk's seen pairs to ``-inf`` in place.

    ``seen`` comes from :func:`_sorted_seen` and ``exclude`` holds long indices, both on the scores' device
    and in the columns' order; the chunk's users are rows ``start .. start + len(scores) - 1``.
    """
    scores[:, PAD] = NEG_INF
    if exclude is not None:
        scores[:, exclude] = NEG_INF
    if seen is not None:
        seen_rows, seen_items = seen
        bounds = torch.tensor([start, start + len(scores)], dtype=seen_rows.dtype, device=seen_rows.device)
        lo, hi = torch.searchsorted(seen_rows, bounds).tolist()
        mask_seen(scores, seen_rows[lo:hi] - start, seen_items[lo:hi])
    return scores


def _chunked_topk(score_chunk: Callable[[int, int], Tensor], n_users: int, k: int, chunk_size: int) -> Tensor:
    """Top-k columns (ties by lower column) of the masked scores ``score_chunk(start, end)``, chunk by chunk."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out: list[Tensor] = []
    for start in range(0, n_users, chunk_size):
        end = min(start + chunk_size, n_users)
        scores = score_chunk(start, end)  # (b, N)
        if scores.dim() != 2 or scores.shape[0] != end - start:
            raise ValueError(f"the scorer returned shape {tuple(scores.shape)} for a chunk of {end - start} users")
        if not 1 <= k <= scores.shape[1]:
            raise ValueError(f"k must be in [1, {scores.shape[1]}] (number of items), got {k}")
        out.append(_topk_lower_index(scores, k))
    if not out:
        return torch.empty(0, k, dtype=torch.long)
    return torch.cat(out)


def topk_from_scorer(
    score_fn: Callable[[Tensor], Tensor],
    n_users: int,
    k: int,
    seen: SeenPairs | None = None,
    chunk_size: int | None = 1024,
    exclude: Tensor | None = None,
    device: torch.device | str = "cpu",
    shuffle_ties: bool = False,
) -> Tensor:
    """Top-k items for ``n_users`` users, scoring chunks of users so memory stays bounded.

    Args:
        score_fn: maps the ``(b,)`` long user rows of a chunk (on ``device``) to their ``(b, N)`` scores.
            It must return a fresh tensor, since seen items are masked in place.
        n_users: number of users; rows are ``0 .. n_users - 1``.
        k: items per user.
        seen: ``(user_row, item)`` pairs, two ``(S,)`` long tensors, masked to ``-inf`` for that user.
        chunk_size: users scored at once; ``None`` keeps one chunk's scores within :data:`CHUNK_BYTES`
            (the catalogue size is read from one user's scores).
        exclude: items masked for every user, as a ``(N,)`` bool mask or a long tensor of indices.
        device: device of the row indices passed to ``score_fn``.
        shuffle_ties: break ties along :func:`tie_order` rather than by lower index. Every chunk's
            columns are then permuted; :func:`score_topk` avoids that by permuting the catalogue once.

    Returns:
        ``(n_users, k)`` long item indices on the device of the scores.
    """
    if chunk_size is None:
        probe = score_fn(torch.zeros(1, dtype=torch.long, device=device)) if n_users else None
        chunk_size = chunk_rows(probe.shape[-1]) if probe is not None else 1
    seen = _sorted_seen(seen, device)
    excluded = _exclude_index(exclude, device)
    orders: dict[int, Tensor] = {}  # the tie order, once the first chunk tells the catalogue size

    def score_chunk(start: int, end: int) -> Tensor:
        scores = _mask(score_fn(torch.arange(start, end, device=device)), start, seen, excluded)
        if not shuffle_ties:
            return scores
        n_items = scores.shape[1]
        if n_items not in orders:
            orders[n_items] = tie_order(n_items, scores.device)
        return scores[:, orders[n_items]]  # PAD stays in column 0

    top = _chunked_topk(score_chunk, n_users, k, chunk_size)
    return next(iter(orders.values()))[top] if orders else top


@torch.no_grad()
def score_topk(
    user_emb: Tensor,
    item_emb: Tensor,
    k: int,
    seen: SeenPairs | None = None,
    chunk_size: int | None = None,
    exclude: Tensor | None = None,
    shuffle_ties: bool = True,
) -> Tensor:
    """Exact top-k items by dot product for every user, over the whole catalogue.

    Ties are broken along :func:`tie_order` by default: items a model embeds identically (an ID-only
    model's cold items) then fill the top-k in an order unrelated to their ids. The catalogue is permuted
    into that order once, so each chunk costs one matrix product (into one reused buffer), one
    ``torch.topk`` and a scatter of ``-inf`` for the masked items. Indices have no gradient, so it runs
    without autograd.

    Args:
        user_emb: ``(U, D)`` user embeddings.
        item_emb: ``(N, D)`` item embeddings on the same device; row 0 is the padding item.
        k: items per user.
        seen: ``(user_row, item)`` pairs over the U users, masked per user.
        chunk_size: users scored at once; ``None`` keeps one chunk's scores within :data:`CHUNK_BYTES`.
            The result does not depend on it.
        exclude: items masked for every user, as a ``(N,)`` bool mask or a long tensor of indices.
        shuffle_ties: ``False`` breaks ties by lower index, as the baselines do.

    Returns:
        ``(U, k)`` long item indices, best first.
    """
    device = user_emb.device
    n_items = item_emb.shape[0]
    if chunk_size is None:
        chunk_size = chunk_rows(n_items)
    seen = _sorted_seen(seen, device)
    excluded = _exclude_index(exclude, device)
    order: Tensor | None = None
    if shuffle_ties and n_items > 0:
        order, inverse = (t.to(device) for t in _tie_permutation(n_items))
        item_emb = item_emb[order]  # ties along the tie order are now ties along the column
        if seen is not None:
            seen = (seen[0], inverse[seen[1]])
        if excluded is not None:
            excluded = inverse[excluded]
    item_t = item_emb.T  # (D, N)
    # One score buffer for every chunk: a fresh (b, N) matrix per chunk costs page faults on the CPU
    # (on 1M items about a third of the matrix product's time).
    buffer = user_emb.new_empty(min(chunk_size, user_emb.shape[0]), n_items)

    def score_chunk(start: int, end: int) -> Tensor:
        scores = torch.matmul(user_emb[start:end], item_t, out=buffer[: end - start])  # (b, N)
        return _mask(scores, start, seen, excluded)

    top = _chunked_topk(score_chunk, user_emb.shape[0], k, chunk_size)
    return top if order is None else order[top]


def rank_metrics(
    topk: Tensor, targets: Tensor, ks: list[int], target_mask: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-user Recall, NDCG, MRR, HitRate and average precision at each k, vectorised over users.

    Targets are a user's *distinct* held-out items: ``PAD`` entries are ignored and an item repeated in a
    row counts once. ``target_mask`` keeps only some targets (a slice, e.g. cold items): hits count only on
    kept targets and the denominators use the number of kept targets. With ``n`` kept targets and the hit
    indicator ``h_r`` at rank ``r = 1..k``:

    - ``recall@k = sum_r h_r / n``
    - ``ndcg@k = sum_r h_r / log2(r + 1)`` divided by the ideal ``sum_{r=1}^{min(n, k)} 1 / log2(r + 1)``
    - ``mrr@k = 1 / r`` of the first hit within k, else 0
    - ``hit@k = 1`` if any hit within k, else 0
    - ``map@k = sum_r P(r) h_r / min(n, k)``, with the precision ``P(r) = sum_{j<=r} h_j / r``: average
      precision at k, whose mean over users is the H&M competition's MAP@12 at ``k = 12``

    Users with ``n = 0`` get NaN for every metric, so ``aggregate`` leaves them out.

    Long because this docstring states every formula the code computes (the code is about 55 lines).

    Args:
        topk: ``(U, K)`` long distinct recommended items per user, best first, ``K >= max(ks)``.
        targets: ``(U, T)`` long held-out items, right-padded with ``PAD``.
        ks: cut-offs.
        target_mask: ``(U, T)`` bool, True for the targets that count.

    Returns:
        ``{"recall@k": (U,), "ndcg@k": (U,), "mrr@k": (U,), "hit@k": (U,), "map@k": (U,)}`` float
        tensors for each k.
    """
    if topk.dim() != 2 or targets.dim() != 2 or topk.shape[0] != targets.shape[0]:
        raise ValueError(
            f"topk (U, K) and targets (U, T) must share U, got {tuple(topk.shape)} and {tuple(targets.shape)}"
        )
    if not ks or min(ks) < 1 or max(ks) > topk.shape[1]:
        raise ValueError(f"ks must be in [1, {topk.shape[1]}] (columns of topk), got {ks}")
    if target_mask is not None and target_mask.shape != targets.shape:
        raise ValueError(
            f"target_mask shape {tuple(target_mask.shape)} != targets shape {tuple(targets.shape)}"
        )

    topk = topk.long()
    targets = targets.long().to(topk.device)
    keep = targets != PAD
    if target_mask is not None:
        keep &= target_mask.to(topk.device)
    # -1 is no item index, so dropped targets can never match a recommendation.
    sorted_t = targets.masked_fill(~keep, -1).sort(dim=1).values  # (U, T)
    distinct = sorted_t != -1
    distinct[:, 1:] &= sorted_t[:, 1:] != sorted_t[:, :-1]
    n_targets = distinct.sum(dim=1)  # (U,)

    n_cols = sorted_t.shape[1]
    if n_cols == 0:
        hits = torch.zeros_like(topk, dtype=torch.bool)
    else:
        pos = torch.searchsorted(sorted_t, topk.contiguous()).clamp_(max=n_cols - 1)
        hits = sorted_t.gather(1, pos) == topk  # (U, K): recommended item is a kept target

    max_k = max(ks)
    ranks = torch.arange(1, max_k + 1, device=topk.device, dtype=torch.float32)
    discount = 1.0 / torch.log2(ranks + 1.0)  # (max_k,)
    ideal_cum = discount.cumsum(0)
    has_targets = n_targets > 0
    nan = torch.tensor(math.nan, device=topk.device)

    out: dict[str, Tensor] = {}
    for k in ks:
        h = hits[:, :k].float()  # (U, k)
        n_hits = h.sum(dim=1)
        any_hit = n_hits > 0
        first = h.argmax(dim=1)  # first maximum, i.e. the first hit when there is one
        ideal = ideal_cum[(n_targets.clamp(min=1, max=k) - 1)]
        precision = h.cumsum(dim=1) / ranks[:k]  # (U, k): P(r), hits in the first r over r
        metrics = {
            f"recall@{k}": n_hits / n_targets.clamp(min=1),
            f"ndcg@{k}": (h * discount[:k]).sum(dim=1) / ideal,
            f"mrr@{k}": torch.where(any_hit, 1.0 / (first + 1).float(), 0.0),
            f"hit@{k}": any_hit.float(),
            f"map@{k}": (precision * h).sum(dim=1) / n_targets.clamp(min=1, max=k),
        }
        for name, value in metrics.items():
            out[name] = torch.where(has_targets, value, nan)
    return out


def aggregate(per_user: dict[str, Tensor], user_mask: Tensor | None = None) -> dict[str, float]:
    """Mean of each per-user metric over the users in ``user_mask``, ignoring NaN (users without targets).

    ``"users"`` is the number of masked users whose values are non-NaN for every metric. A metric with no
    such user is NaN.
    """
    result: dict[str, float] = {}
    counted: Tensor | None = None
    for name, values in per_user.items():
        if user_mask is not None:
            values = values[user_mask.to(values.device)]
        valid = ~torch.isnan(values)
        counted = valid if counted is None else counted & valid.to(counted.device)
        result[name] = values[valid].mean().item() if valid.any() else math.nan
    result["users"] = int(counted.sum().item()) if counted is not None else 0
    return result


def bootstrap_interval(
    values: Tensor, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-user values over users (NaN users left out).

    Users are resampled with replacement ``n_resamples`` times from a fixed seed, so the same values give
    the same interval. It measures the sampling noise of the evaluated users, not the training noise
    between seeds (average each user's values over seeds first to fold that in). ``(nan, nan)`` without
    users.
    """
    v = values.detach().double().cpu()
    v = v[~torch.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    # Resamples are drawn in blocks of about 2**22 indices (the same stream as one draw), so memory
    # stays bounded at any number of users.
    block = max(1, 2**22 // len(v))
    means = torch.cat(
        [
            v[torch.randint(len(v), (min(block, n_resamples - start), len(v)), generator=g)].mean(dim=1)
            for start in range(0, n_resamples, block)
        ]
    )
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype)).tolist()
    return lo, hi


def _real_items(topk: Tensor, k: int) -> Tensor:
    """The recommended items in the first k columns, flattened, without ``PAD``."""
    if not 1 <= k <= topk.shape[1]:
        raise ValueError(f"k must be in [1, {topk.shape[1]}] (columns of topk), got {k}")
    items = topk[:, :k].reshape(-1)
    return items[items != PAD]


def coverage_at_k(topk: Tensor, n_items: int, k: int) -> float:
    """Fraction of the catalogue's real items (``1 .. n_items - 1``) that appear in some user's top-k.

    Args:
        n_items: N, the number of item indices including ``PAD``.
    """
    if n_items < 2:
        raise ValueError(f"n_items must count PAD plus at least one real item, got {n_items}")
    return _real_items(topk, k).unique().numel() / (n_items - 1)


def popularity_percentile_at_k(topk: Tensor, item_popularity: Tensor, k: int) -> float:
    """Mean popularity percentile of the recommended items, in ``[0, 1]``.

    An item's percentile is the average (tie-aware) rank of its training count among the real items
    ``1 .. N - 1``, scaled so the least popular item gets 0 and the most popular gets 1. ``PAD`` entries of
    ``topk`` are left out.

    Args:
        item_popularity: ``(N,)`` training interaction counts; entry 0 (``PAD``) is ignored.
    """
    popularity = item_popularity.float()
    real = popularity[1:].sort().values  # (N - 1,)
    if real.numel() < 2:
        raise ValueError("popularity percentiles need at least two real items")
    below = torch.searchsorted(real, popularity, right=False)
    up_to = torch.searchsorted(real, popularity, right=True)
    percentile = (below + (up_to - below - 1) / 2) / (real.numel() - 1)  # (N,), mid-rank for ties
    items = _real_items(topk, k).to(percentile.device)
    return percentile[items].mean().item() if items.numel() else math.nan


def novelty_at_k(topk: Tensor, item_popularity: Tensor, n_users_train: int, k: int) -> float:
    """Mean self-information ``-log2 p(i)`` of the recommended items, in bits.

    ``p(i) = (count_i + 1) / (n_users_train + 1)`` is the add-one smoothed share of training users who
    interacted with item i, so unseen items get a finite value and ``p(i) <= 1``. ``PAD`` entries of
    ``topk`` are left out.

    Args:
        item_popularity: ``(N,)`` number of distinct training users per item (at most ``n_users_train``).
        n_users_train: number of training users.
    """
    if (item_popularity > n_users_train).any():
        raise ValueError("item_popularity must count distinct training users, at most n_users_train")
    p = (item_popularity.double() + 1) / (n_users_train + 1)
    items = _real_items(topk, k).to(p.device)
    return (-torch.log2(p[items])).mean().item() if items.numel() else math.nan


def intra_list_diversity_at_k(topk: Tensor, item_features: Tensor, k: int, chunk_size: int = 1024) -> float:
    """``1 -`` mean pairwise cosine similarity within each user's top-k, averaged over users.

    Features are L2-normalised here; an all-zero feature vector has similarity 0 to everything. Pairs are
    the ``k * (k - 1)`` ordered pairs of distinct positions.

    Args:
        item_features: ``(N, F)`` item feature vectors (e.g. embeddings or one-hot categories).
        k: list length, at least 2.
        chunk_size: users processed at once.
    """
    if not 2 <= k <= topk.shape[1]:
        raise ValueError(f"k must be in [2, {topk.shape[1]}] (columns of topk), got {k}")
    features = F.normalize(item_features.float(), dim=-1)
    total = 0.0
    for start in range(0, topk.shape[0], chunk_size):
        f = features[topk[start : start + chunk_size, :k].to(features.device)]  # (b, k, F)
        sim = f @ f.transpose(1, 2)  # (b, k, k)
        off_diagonal = sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(dim=1)
        total += (1.0 - off_diagonal / (k * (k - 1))).sum().item()
    return total / topk.shape[0] if topk.shape[0] else math.nan
