"""Paired comparisons: sign-flip p-values and bootstrap intervals against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from towerrec.evaluation.stats import PairedDifference, compare_per_user, paired_difference, sign_flip_p_value


def test_exact_sign_flip_by_hand():
    # d = (1, 2, 3): the 8 sign patterns give sums 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 twice.
    assert sign_flip_p_value(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 8)
    # d = (1, -1, 2): sums 2, -2, 4, 0, 0, -4, 2, -2 around the observed 2: six of eight reach |2|.
    assert sign_flip_p_value(torch.tensor([1.0, -1.0, 2.0])) == pytest.approx(6 / 8)
    # NaN users are left out: (1, 2, 3) again.
    assert sign_flip_p_value(np.array([1.0, math.nan, 2.0, 3.0])) == pytest.approx(2 / 8)
    assert math.isnan(sign_flip_p_value(torch.tensor([math.nan])))


def test_monte_carlo_sign_flip_matches_the_exact_value_and_is_seeded():
    d = torch.tensor([0.3, -0.1, 0.5, 0.2, 0.0, 0.4, -0.2, 0.1, 0.6, -0.3, 0.2, 0.1, 0.05, 0.15])  # n = 14
    exact = sign_flip_p_value(d, n_flips=2**14)  # enumerates all 16,384 patterns
    sampled = sign_flip_p_value(d, n_flips=10_000)  # 2**14 > 10,000: random patterns
    assert sampled == pytest.approx(exact, abs=0.01)  # sampling error ~ sqrt(p(1-p)/10,000) < 0.005
    assert sampled == sign_flip_p_value(d, n_flips=10_000)  # fixed seed
    assert sampled != sign_flip_p_value(d, n_flips=10_000, seed=1)


def test_identical_inputs_give_zero_difference_and_p_one():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(500, generator=g)
    out = paired_difference(a, a.clone())
    assert out.mean_diff == 0.0 and (out.lo, out.hi) == (0.0, 0.0) and out.p_value == 1.0
    assert out.verdict() == "not distinguishable" and out.users == 500


def test_large_shift_gives_p_near_zero_and_the_sign_of_the_verdict():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(300, generator=g)
    a = b + 0.2 + 0.01 * torch.randn(300, generator=g)
    out = paired_difference(a, b)
    assert out.p_value == pytest.approx(1 / 10_001)  # no random pattern reaches the observed mean
    assert out.lo < out.mean_diff < out.hi and 0.19 < out.lo and out.hi < 0.21
    assert out.verdict() == "better" and paired_difference(b, a).verdict() == "worse"


def test_bootstrap_interval_of_two_users_by_hand():
    # d = (0, 1): resampled means 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # percentiles of 10,000 resamples are 0 and 1.
    out = paired_difference(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert (out.mean_diff, out.lo, out.hi) == (0.5, 0.0, 1.0)
    assert out.p_value == 1.0  # flipping the 0 changes nothing and flipping the 1 keeps |mean| = 0.5
    assert (out.mean_a, out.mean_b) == (1.0, 0.5)


def test_users_without_a_value_in_either_are_left_out():
    a = torch.tensor([1.0, math.nan, 0.0, 1.0])
    b = torch.tensor([0.0, 1.0, math.nan, 0.0])
    out = paired_difference(a, b)
    assert out.users == 2 and out.mean_diff == 1.0 and out.p_value == pytest.approx(2 / 4)  # sums 2, 0, 0, -2
    empty = paired_difference(torch.tensor([math.nan]), torch.tensor([1.0]))
    assert empty.users == 0 and math.isnan(empty.p_value) and empty.verdict() == "not distinguishable"
    with pytest.raises(ValueError, match="aligned per user"):
        paired_difference(torch.zeros(3), torch.zeros(4))


def test_compare_per_user_matches_users_by_index_and_lists_each_slice_metric():
    a = pd.DataFrame({"user_idx": [1, 2, 3], "all/recall@20": [1.0, 0.0, 1.0], "cold_items/recall@20": [1.0, math.nan, 0.0]})
    b = pd.DataFrame({"user_idx": [3, 1, 9], "all/recall@20": [0.0, 0.0, 1.0], "cold_items/recall@20": [0.0, 0.0, 1.0]})
    out = compare_per_user(a, b, ["all", "warm_items", "cold_items"])
    assert out[["slice", "metric"]].values.tolist() == [["all", "recall@20"], ["cold_items", "recall@20"]]
    # users 1 and 3 are in both: all = (1 - 0, 1 - 0); cold = (1 - 0, 0 - 0)
    row = out.iloc[0]
    assert row.users == 2 and row.mean_diff == 1.0 and row.p_value == pytest.approx(2 / 4)  # sums 2, 0, 0, -2
    assert out.iloc[1].mean_diff == 0.5 and set(out.columns) >= {"lo", "hi", "verdict", *PairedDifference.__dataclass_fields__}
