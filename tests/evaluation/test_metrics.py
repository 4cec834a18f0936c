"""Metrics against rankings and values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from towerrec import ranking
from towerrec.ranking import (
    PAD,
    aggregate,
    bootstrap_interval,
    chunk_rows,
    coverage_at_k,
    intra_list_diversity_at_k,
    mask_seen,
    novelty_at_k,
    popularity_percentile_at_k,
    rank_metrics,
    score_topk,
    tie_order,
    topk_from_scorer,
    topk_items,
)

INF = float("inf")


def reference_topk(scores: torch.Tensor, k: int, seen: set[tuple[int, int]] = frozenset()) -> torch.Tensor:
    """Plain-python top-k: sort by (score descending, item ascending), PAD and seen pairs at -inf."""
    rows = []
    for u, row in enumerate(scores.tolist()):
        row = [-INF if i == PAD or (u, i) in seen else s for i, s in enumerate(row)]
        rows.append(sorted(range(len(row)), key=lambda i, row=row: (-row[i], i))[:k])
    return torch.tensor(rows, dtype=torch.long)


def assert_metric(out: dict[str, torch.Tensor], name: str, expected: list[float]) -> None:
    torch.testing.assert_close(out[name], torch.tensor(expected), equal_nan=True, msg=name)


# ---------------------------------------------------------------- top-k


def test_topk_orders_by_score_then_lower_index():
    scores = torch.tensor(
        [
            [0.0, 1.0, 2.0, 2.0, 0.5],  # 2 and 3 tie at the top
            [0.0, 3.0, 1.0, 1.0, 1.0],  # a tie of three straddles the cut after rank 2
            [0.0, 1.0, 1.0, 1.0, 1.0],  # everything ties
        ]
    )
    assert topk_items(scores, 3).tolist() == [[2, 3, 1], [1, 2, 3], [1, 2, 3]]


def test_topk_ties_in_a_large_catalogue_take_the_lowest_indices():
    scores = torch.zeros(3, 5000)
    scores[1, 4000] = 1.0
    top = topk_items(scores, 5)
    assert top.tolist() == [[1, 2, 3, 4, 5], [4000, 1, 2, 3, 4], [1, 2, 3, 4, 5]]


def test_topk_matches_reference_on_many_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 200), generator=g).float()
    expected = reference_topk(scores, 20)
    assert torch.equal(topk_items(scores.clone(), 20), expected)


def numpy_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The reference for long rows: numpy's lexsort by (score descending, item ascending), PAD at -inf."""
    s = scores.numpy().copy()
    s[:, PAD] = -INF
    cols = np.arange(s.shape[1])
    return torch.from_numpy(np.stack([np.lexsort((cols, -row))[:k] for row in s]))


def test_topk_over_long_rows_narrowed_to_blocks_equals_the_reference(monkeypatch):
    """Long CPU rows are ranked over the blocks whose maximum reaches the k-th block maximum: the same result."""
    ranked_widths = []
    whole_rows = ranking._topk_lower_index_of_all

    def spy(scores, k):
        ranked_widths.append(scores.shape[1])
        return whole_rows(scores, k)

    monkeypatch.setattr(ranking, "_topk_lower_index_of_all", spy)
    g = torch.Generator().manual_seed(0)
    n, k = 160 * 64 * 2 + 37, 20  # 37 columns past the last whole block
    scores = torch.randn(40, n, generator=g)
    scores[1, n - 5] = 50.0  # the best item in the columns past the last block
    scores[2, :: 3] = -INF  # masked items
    scores[3, 64:4000] = 9.0  # one tie of 3,936 items straddles the cut: the lowest 20 indices
    scores[4, 1 : n - 3] = -INF  # fewer than k finite scores
    scores[5, 100:300] = torch.randint(0, 3, (200,), generator=g).float() + 10.0  # ties inside the top blocks
    # A tie at the cut between a block of lower columns and one with a higher maximum.
    scores[6, 64 * 3 : 64 * 3 + 30] = 12.0
    scores[6, 64 * 20 : 64 * 20 + 30] = 12.0
    scores[6, 64 * 20 + 40] = 12.5
    expected = numpy_topk(scores, k)
    assert torch.equal(topk_items(scores.clone(), k), expected)
    assert k * 64 + 37 in ranked_widths  # the narrowed rows
    assert ranked_widths[-1] == n  # the rows whose bound ties (3, 4) ranked whole
    assert topk_items(scores.clone(), k)[3].tolist() == list(range(64, 84))
    assert topk_items(scores.clone(), k)[6].tolist()[1:] == list(range(64 * 3, 64 * 3 + 19))
    # Small integer scores tie at every bound: every row is ranked whole, with the same result.
    ties = torch.randint(0, 4, (8, n), generator=g).float()
    assert torch.equal(topk_items(ties.clone(), k), numpy_topk(ties, k))
    bad = scores.clone()
    bad[7, 555] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        topk_items(bad, k)


def test_topk_never_returns_pad_ahead_of_real_items():
    scores = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    assert topk_items(scores, 3).tolist() == [[3, 2, 1]]
    assert scores[0, PAD] == -INF  # documented in-place masking


def test_topk_fills_short_rows_with_masked_items_by_lower_index():
    scores = torch.tensor([[5.0, 1.0, -INF, 2.0]])
    # PAD becomes -inf and ties with item 2; the lower index comes first.
    assert topk_items(scores, 3).tolist() == [[3, 1, 0]]


def test_topk_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        topk_items(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="NaN"):
        topk_items(torch.tensor([[0.0, math.nan, 1.0]]), 1)


def test_mask_seen_sets_pairs_to_minus_inf_only():
    scores = torch.arange(8.0).view(2, 4)
    out = mask_seen(scores, torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3]))
    assert out is scores
    assert out.tolist() == [[0.0, 1.0, -INF, 3.0], [-INF, 5.0, 6.0, -INF]]


def test_score_topk_by_hand_with_seen_items():
    item_emb = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    user_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # user 0 scores items 1..4: 1, 0, 0.7, -1; user 1: 0, 1, 0.7, 0
    assert score_topk(user_emb, item_emb, k=3).tolist() == [[1, 3, 2], [2, 3, 1]]
    seen = (torch.tensor([1, 0]), torch.tensor([2, 1]))  # user 1 saw item 2, user 0 saw item 1
    assert score_topk(user_emb, item_emb, k=3, seen=seen).tolist() == [[3, 2, 4], [3, 1, 4]]
    assert score_topk(user_emb, item_emb, k=2, exclude=torch.tensor([3])).tolist() == [[1, 2], [2, 1]]
    exclude_mask = torch.tensor([False, True, False, False, False])
    assert score_topk(user_emb, item_emb, k=2, exclude=exclude_mask).tolist() == [[3, 2], [2, 3]]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_score_topk_equals_unchunked(chunk_size):
    g = torch.Generator().manual_seed(1)
    # Small integer embeddings produce many tied scores, so the tie-break is exercised too.
    user_emb = torch.randint(-2, 3, (23, 4), generator=g).float()
    item_emb = torch.randint(-2, 3, (40, 4), generator=g).float()
    rows = torch.randint(0, 23, (60,), generator=g)
    items = torch.randint(0, 40, (60,), generator=g)
    seen = (rows, items)
    expected = reference_topk(user_emb @ item_emb.T, 10, set(zip(rows.tolist(), items.tolist(), strict=True)))
    chunked = score_topk(user_emb, item_emb, 10, seen=seen, chunk_size=chunk_size, shuffle_ties=False)
    assert torch.equal(chunked, expected)
    assert torch.equal(chunked, score_topk(user_emb, item_emb, 10, seen=seen, chunk_size=1000, shuffle_ties=False))
    # Shuffled ties (the default for models): the index rule applied along the fixed tie order.
    order = tie_order(40)
    shuffled = reference_topk(
        (user_emb @ item_emb.T)[:, order], 10, {(r, int((order == i).nonzero())) for r, i in zip(rows.tolist(), items.tolist(), strict=True)}
    )
    assert torch.equal(score_topk(user_emb, item_emb, 10, seen=seen, chunk_size=chunk_size), order[shuffled])


def test_shuffled_ties_follow_the_fixed_tie_order_not_the_item_index():
    scores = torch.zeros(1, 50)
    scores[0, 1:] = 1.0  # every real item ties, as an ID-only model's cold items do
    order = tie_order(50)
    assert order[0] == 0 and sorted(order.tolist()) == list(range(50))
    top = topk_items(scores.clone(), 5, shuffle_ties=True)[0].tolist()
    assert top == order[1:6].tolist() and top != [1, 2, 3, 4, 5]
    scores[0, 30] = 2.0  # a better score still wins
    assert topk_items(scores.clone(), 5, shuffle_ties=True)[0, 0] == 30


def test_topk_from_scorer_passes_chunk_rows_and_masks_seen():
    popularity = torch.tensor([0.0, 5.0, 9.0, 7.0, 1.0])
    calls = []

    def score_fn(rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.tolist())
        return popularity.repeat(len(rows), 1)

    seen = (torch.tensor([2, 0, 2]), torch.tensor([2, 3, 3]))
    top = topk_from_scorer(score_fn, n_users=3, k=2, seen=seen, chunk_size=2)
    assert calls == [[0, 1], [2]]
    assert top.tolist() == [[2, 1], [2, 3], [1, 4]]
    assert popularity.tolist() == [0.0, 5.0, 9.0, 7.0, 1.0]


# ---------------------------------------------------------------- ranking metrics


def test_rank_metrics_by_hand():
    topk = torch.tensor(
        [
            [5, 3, 7, 2, 9],  # targets 3, 2: hits at ranks 2 and 4
            [4, 1, 6, 8, 3],  # targets 4, 4, 6 = {4, 6}: hits at ranks 1 and 3
            [1, 2, 3, 4, 5],  # no targets
            [1, 2, 3, 4, 5],  # targets 2, 11, 12: one hit at rank 2, three targets
            [0, 7, 8, 9, 10],  # PAD recommended first must not match the padded targets
        ]
    )
    targets = torch.tensor([[3, 2, 0], [4, 4, 6], [0, 0, 0], [2, 11, 12], [7, 0, 0]])
    out = rank_metrics(topk, targets, ks=[1, 3, 5])
    nan = math.nan
    l2, l3, l4, l5 = math.log2(2), math.log2(3), math.log2(4), math.log2(5)

    assert_metric(out, "recall@1", [0.0, 1 / 2, nan, 0.0, 0.0])
    assert_metric(out, "ndcg@1", [0.0, 1.0, nan, 0.0, 0.0])
    assert_metric(out, "mrr@1", [0.0, 1.0, nan, 0.0, 0.0])
    assert_metric(out, "hit@1", [0.0, 1.0, nan, 0.0, 0.0])

    assert_metric(out, "recall@3", [1 / 2, 1.0, nan, 1 / 3, 1.0])
    assert_metric(
        out,
        "ndcg@3",
        [
            (1 / l3) / (1 / l2 + 1 / l3),
            (1 / l2 + 1 / l4) / (1 / l2 + 1 / l3),
            nan,
            (1 / l3) / (1 / l2 + 1 / l3 + 1 / l4),
            (1 / l3) / (1 / l2),
        ],
    )
    assert_metric(out, "mrr@3", [1 / 2, 1.0, nan, 1 / 2, 1 / 2])
    assert_metric(out, "hit@3", [1.0, 1.0, nan, 1.0, 1.0])

    assert_metric(out, "recall@5", [1.0, 1.0, nan, 1 / 3, 1.0])
    assert_metric(
        out,
        "ndcg@5",
        [
            (1 / l3 + 1 / l5) / (1 / l2 + 1 / l3),
            (1 / l2 + 1 / l4) / (1 / l2 + 1 / l3),
            nan,
            (1 / l3) / (1 / l2 + 1 / l3 + 1 / l4),
            (1 / l3) / (1 / l2),
        ],
    )
    assert_metric(out, "mrr@5", [1 / 2, 1.0, nan, 1 / 2, 1 / 2])

    # Average precision: sum of precision at each hit rank, over min(n targets, k).
    assert_metric(out, "map@1", [0.0, 1.0, nan, 0.0, 0.0])
    assert_metric(out, "map@3", [(1 / 2) / 2, (1 + 2 / 3) / 2, nan, (1 / 2) / 3, 1 / 2])
    assert_metric(out, "map@5", [(1 / 2 + 2 / 4) / 2, (1 + 2 / 3) / 2, nan, (1 / 2) / 3, 1 / 2])
    metrics = ("recall", "ndcg", "mrr", "hit", "map")
    assert sorted(out) == sorted(f"{m}@{k}" for m in metrics for k in (1, 3, 5))


def competition_apk(actual: list[int], predicted: list[int], k: int) -> float:
    """Average precision at k as the H&M competition's reference code computes it (plain python)."""
    score, hits = 0.0, 0
    for i, p in enumerate(predicted[:k]):
        if p in actual and p not in predicted[:i]:
            hits += 1
            score += hits / (i + 1)
    return score / min(len(actual), k)


def test_map_at_12_by_hand_and_against_the_competition_formula():
    ranking = list(range(1, 13))  # items 1..12, best first
    targets = torch.tensor(
        [
            list(range(1, 14)),  # 13 purchases, all 12 slots hit: AP = 12 / min(13, 12) = 1
            [2, 5, 40] + [0] * 10,  # hits at ranks 2 and 5: (1/2 + 2/5) / 3
            [12, 12] + [0] * 11,  # one distinct purchase, hit at rank 12: (1/12) / 1
            [99] + [0] * 12,  # a purchase outside the list: 0
        ]
    )
    out = rank_metrics(torch.tensor([ranking] * 4), targets, ks=[12])
    assert_metric(out, "map@12", [1.0, (1 / 2 + 2 / 5) / 3, 1 / 12, 0.0])

    g = torch.Generator().manual_seed(0)
    topk = torch.stack([torch.randperm(30, generator=g)[:20] + 1 for _ in range(40)])  # distinct items
    targets = torch.randint(0, 31, (40, 8), generator=g)  # PAD = 0 pads; repeats count once
    targets[:, 0] = torch.randint(1, 31, (40,), generator=g)  # every user has a purchase
    out = rank_metrics(topk, targets, ks=[12, 20])
    for k in (12, 20):
        expected = [
            competition_apk(sorted(set(t) - {PAD}), p, k)
            for t, p in zip(targets.tolist(), topk.tolist(), strict=True)
        ]
        torch.testing.assert_close(out[f"map@{k}"], torch.tensor(expected))


def test_rank_metrics_target_mask_slices_warm_and_cold():
    topk = torch.tensor([[5, 3, 7, 2, 9], [4, 1, 6, 8, 3]])
    targets = torch.tensor([[3, 2, 7], [4, 0, 0]])
    cold = torch.tensor([[False, True, True], [False, False, False]])  # items 2 and 7 are cold
    l2, l3, l4, l5 = math.log2(2), math.log2(3), math.log2(4), math.log2(5)

    cold_out = rank_metrics(topk, targets, ks=[5], target_mask=cold)
    # user 0, cold targets {2, 7} at ranks 4 and 3; user 1 has no cold target
    assert_metric(cold_out, "recall@5", [1.0, math.nan])
    assert_metric(cold_out, "ndcg@5", [(1 / l4 + 1 / l5) / (1 / l2 + 1 / l3), math.nan])
    assert_metric(cold_out, "mrr@5", [1 / 3, math.nan])

    warm_out = rank_metrics(topk, targets, ks=[1, 5], target_mask=~cold)
    # user 0, warm target {3} at rank 2; user 1, warm target {4} at rank 1
    assert_metric(warm_out, "recall@1", [0.0, 1.0])
    assert_metric(warm_out, "ndcg@5", [1 / l3, 1.0])
    assert_metric(warm_out, "mrr@5", [1 / 2, 1.0])

    # Without a mask all three of user 0's targets count.
    assert_metric(rank_metrics(topk, targets, ks=[3]), "recall@3", [2 / 3, 1.0])
    assert aggregate(cold_out)["users"] == 1
    assert aggregate(warm_out)["users"] == 2


def test_rank_metrics_rejects_cutoff_beyond_topk():
    with pytest.raises(ValueError, match="ks must be"):
        rank_metrics(torch.tensor([[1, 2]]), torch.tensor([[1]]), ks=[3])


def test_rank_metrics_with_no_target_columns_is_nan():
    out = rank_metrics(torch.tensor([[1, 2]]), torch.zeros(1, 0, dtype=torch.long), ks=[2])
    assert math.isnan(out["recall@2"].item())


def test_aggregate_nanmean_over_user_mask():
    per_user = {
        "recall@5": torch.tensor([1.0, math.nan, 0.5, 0.0]),
        "hit@5": torch.tensor([1.0, math.nan, 1.0, 0.0]),
    }
    everyone = aggregate(per_user)
    assert everyone == pytest.approx({"recall@5": 0.5, "hit@5": 2 / 3, "users": 3})
    segment = aggregate(per_user, torch.tensor([True, True, False, False]))
    assert segment == pytest.approx({"recall@5": 1.0, "hit@5": 1.0, "users": 1})
    empty = aggregate(per_user, torch.tensor([False, True, False, False]))
    assert math.isnan(empty["recall@5"]) and empty["users"] == 0
    # "users" counts users valid for every metric
    mixed = {"a": torch.tensor([1.0, math.nan, 0.0]), "b": torch.tensor([math.nan, 1.0, 0.0])}
    assert aggregate(mixed) == pytest.approx({"a": 0.5, "b": 0.5, "users": 1})


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_users():
    g = torch.Generator().manual_seed(1)
    few = (torch.rand(50, generator=g) < 0.1).double()
    many = (torch.rand(5000, generator=g) < 0.1).double()
    lo, hi = bootstrap_interval(torch.cat([few, torch.tensor([math.nan] * 5)]))  # NaN users left out
    assert lo < few.mean().item() < hi
    assert (lo, hi) == bootstrap_interval(few)  # fixed seed: the same values give the same interval
    lo_m, hi_m = bootstrap_interval(many)
    assert lo_m < many.mean().item() < hi_m
    assert hi_m - lo_m < (hi - lo) / 5  # sqrt(100) = 10x narrower in expectation
    # About 95% of the resampled means fall inside: for p = 0.1 and n = 5000 the normal interval is +-0.0083.
    assert hi_m - lo_m == pytest.approx(2 * 1.96 * math.sqrt(0.09 / 5000), rel=0.15)
    assert bootstrap_interval(torch.zeros(10)) == (0.0, 0.0)
    assert all(math.isnan(v) for v in bootstrap_interval(torch.tensor([math.nan])))


# ---------------------------------------------------------------- beyond accuracy


def test_coverage_counts_distinct_real_items():
    topk = torch.tensor([[1, 2], [2, 3]])
    assert coverage_at_k(topk, n_items=6, k=2) == pytest.approx(3 / 5)
    assert coverage_at_k(topk, n_items=6, k=1) == pytest.approx(2 / 5)
    assert coverage_at_k(torch.tensor([[0, 1]]), n_items=6, k=2) == pytest.approx(1 / 5)


def test_popularity_percentile_by_rank_of_count():
    popularity = torch.tensor([1000.0, 10.0, 20.0, 30.0, 40.0, 50.0])  # PAD's count is ignored
    # percentiles of items 1..5: 0, 0.25, 0.5, 0.75, 1
    topk = torch.tensor([[5, 1], [3, 4]])
    assert popularity_percentile_at_k(topk, popularity, k=2) == pytest.approx((1 + 0 + 0.5 + 0.75) / 4)
    assert popularity_percentile_at_k(topk, popularity, k=1) == pytest.approx((1 + 0.5) / 2)
    # ties share the mid-rank: counts 5, 5, 1 -> ranks 1.5, 1.5, 0 out of 2
    tied = torch.tensor([99.0, 5.0, 5.0, 1.0])
    assert popularity_percentile_at_k(torch.tensor([[1, 3]]), tied, k=2) == pytest.approx((0.75 + 0.0) / 2)


def test_novelty_is_mean_self_information():
    popularity = torch.tensor([0, 3, 7, 1])  # with 7 users: p = 4/8, 8/8, 2/8 -> 1, 0, 2 bits
    topk = torch.tensor([[1, 3], [2, 3]])
    assert novelty_at_k(topk, popularity, n_users_train=7, k=2) == pytest.approx((1 + 2 + 0 + 2) / 4)
    assert novelty_at_k(topk, popularity, n_users_train=7, k=1) == pytest.approx((1 + 0) / 2)
    with pytest.raises(ValueError, match="at most n_users_train"):
        novelty_at_k(topk, popularity, n_users_train=5, k=2)


@pytest.mark.parametrize("chunk_size", [1, 1024])
def test_intra_list_diversity_by_hand(chunk_size):
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # item 2 normalised to (0, 1)
    s = 1 / math.sqrt(2)
    topk = torch.tensor([[1, 2, 3], [1, 3, 2]])
    # k=2: user 0 pair (1, 2) has cosine 0, user 1 pair (1, 3) has cosine 1/sqrt(2)
    assert intra_list_diversity_at_k(topk, features, k=2, chunk_size=chunk_size) == pytest.approx(
        ((1 - 0) + (1 - s)) / 2
    )
    # k=3: pairs (1,2)=0, (1,3)=s, (2,3)=s for both users
    assert intra_list_diversity_at_k(topk, features, k=3, chunk_size=chunk_size) == pytest.approx(
        1 - 2 * s / 3
    )
    with pytest.raises(ValueError, match="k must be"):
        intra_list_diversity_at_k(topk, features, k=1)


def test_scorer_path_with_shuffled_ties_equals_score_topk_and_the_budgeted_chunks():
    g = torch.Generator().manual_seed(2)
    user_emb = torch.randint(-2, 3, (30, 4), generator=g).float()  # many ties
    item_emb = torch.randint(-2, 3, (60, 4), generator=g).float()
    seen = (torch.randint(0, 30, (90,), generator=g), torch.randint(0, 60, (90,), generator=g))
    exclude = torch.tensor([5, 17])
    expected = score_topk(user_emb, item_emb, 12, seen=seen, exclude=exclude, chunk_size=7)
    assert torch.equal(score_topk(user_emb, item_emb, 12, seen=seen, exclude=exclude), expected)  # chunk from budget
    scores = user_emb @ item_emb.T
    for chunk_size in (4, None):
        via_scorer = topk_from_scorer(
            lambda rows: scores[rows].clone(), 30, 12, seen=seen, chunk_size=chunk_size, exclude=exclude, shuffle_ties=True
        )
        assert torch.equal(via_scorer, expected)


def test_chunk_size_follows_the_memory_budget():
    assert chunk_rows(1_000_000) == 67  # 256 MiB of float32 scores per chunk
    assert chunk_rows(25_000) == 2684
    assert chunk_rows(1_000, budget_bytes=4_000 * 10) == 10
    assert chunk_rows(10**12) == 1  # at least one user


def test_nan_only_matters_where_it_could_be_ranked():
    scores = torch.tensor([[0.0, math.nan, 1.0, 2.0], [math.nan, 3.0, 1.0, 2.0]])
    seen = (torch.tensor([0]), torch.tensor([1]))  # user 0's NaN item is seen, user 1's NaN is PAD
    top = topk_from_scorer(lambda rows: scores[rows].clone(), 2, 2, seen=seen)
    assert top.tolist() == [[3, 2], [1, 3]]
    with pytest.raises(ValueError, match="NaN"):
        topk_from_scorer(lambda rows: scores[rows].clone(), 2, 2)
