"""The audience evaluation: metrics against hand-computed cases, the task's windows, the baselines, the run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from towerrec.evaluation.audience_task import (
    AudienceScorer,
    BlendAudience,
    CategoryAffinity,
    CustomerPopularity,
    RFMAudience,
    audience_metrics,
    audience_task,
    choose_blend,
    cutoffs,
    per_item_frame,
    rank_customers,
    simplex_grid,
    summarize,
)
from towerrec.evaluation.report import load_results
from towerrec.evaluation.results import read_results


def test_metrics_against_a_hand_computed_case():
    ranked = np.array([[3, 1, 0, 2, -1], [0, 1, 2, 3, 4]])
    buyers = [np.array([1, 2]), np.array([0])]
    n_ranked = np.array([5, 5])
    m = audience_metrics(ranked, buyers, n_ranked, {"1": 1, "3": 3, "4": 4, "80%": 4})
    # item 0: top 1 = [3] no buyer; top 3 = [3, 1, 0]: one of its 2 buyers; top 4 adds 2: both.
    np.testing.assert_allclose(m["precision@1"], [0, 1])
    np.testing.assert_allclose(m["precision@3"], [1 / 3, 1 / 3])
    np.testing.assert_allclose(m["recall@3"], [1 / 2, 1])
    np.testing.assert_allclose(m["precision@4"], [2 / 4, 1 / 4])
    np.testing.assert_allclose(m["recall@4"], [1, 1])
    np.testing.assert_allclose(m["recall@80%"], m["recall@4"])
    # lift: precision over the buyers' share of the ranked customers (2/5 and 1/5).
    np.testing.assert_allclose(m["lift@3"], [(1 / 3) / (2 / 5), (1 / 3) / (1 / 5)])
    np.testing.assert_allclose(m["lift@1"], [0, 5])


def test_cutoffs_as_counts_and_shares():
    assert cutoffs(200, [10, 50], [0.01, 0.05]) == {"10": 10, "50": 50, "1%": 2, "5%": 10}
    assert cutoffs(30, [], [0.01]) == {"1%": 1}


class _Fixed(AudienceScorer):
    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=float)

    def score(self, item_rows):
        return self.scores[item_rows]


def test_rank_customers_masks_past_buyers_and_breaks_ties_by_a_fixed_order():
    task = SimpleNamespace(
        items=np.arange(2),
        customers=np.arange(1, 5),
        past=[np.array([0]), np.array([], dtype=int)],
        exclude_buyers=True,
    )
    scorer = _Fixed([[9.0, 1.0, 5.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    ranked = rank_customers(scorer, task, 4)
    assert ranked[0].tolist() == [2, 3, 1, -1]  # customer 0 bought it before: not ranked
    perm = np.random.default_rng(0).permutation(4)
    assert ranked[1].tolist() == perm.tolist()  # all tied: the fixed random order, not the id order
    task.exclude_buyers = False
    assert rank_customers(scorer, task, 4)[0].tolist() == [0, 2, 3, 1]


def test_blend_averages_rank_percentiles_with_ties_shared():
    task = SimpleNamespace(customers=np.arange(4))
    a = _Fixed([[10.0, 20.0, 30.0, 40.0]])  # percentiles 1/4, 2/4, 3/4, 1
    b = _Fixed([[5.0, 5.0, 0.0, 0.0]])  # ties share their average rank: 3.5/4, 3.5/4, 1.5/4, 1.5/4
    blend = BlendAudience({"a": a, "b": b}, {"a": 0.5, "b": 0.5}).fit(task, None)
    np.testing.assert_allclose(blend.score(np.array([0])), [[(1 + 3.5) / 8, (2 + 3.5) / 8, (3 + 1.5) / 8, (4 + 1.5) / 8]])
    only_a = BlendAudience({"a": a, "b": b}, {"a": 1.0, "b": 0.0}).fit(task, None)
    np.testing.assert_allclose(only_a.score(np.array([0])), [[0.25, 0.5, 0.75, 1.0]])
    with pytest.raises(ValueError, match="every weight is 0"):
        BlendAudience({"a": a}, {"a": 0.0})


def test_simplex_grid_sums_to_one():
    grid = simplex_grid(["m", "x", "y"], 0.25)
    assert len(grid) == 15 and all(sum(g.values()) == pytest.approx(1) for g in grid)
    assert grid[0] == {"m": 1.0, "x": 0.0, "y": 0.0}  # the model alone comes first (wins ties)
    with pytest.raises(ValueError, match="must divide 1"):
        simplex_grid(["m"], 0.3)


def test_choose_blend_takes_the_weights_that_find_the_validation_buyers():
    """An oracle member that scores the buyers highest gets all the weight; a useless one none."""
    task = SimpleNamespace(
        items=np.arange(2), customers=np.arange(6), buyers=[np.array([4, 5]), np.array([0])],
        past=[np.array([], dtype=int)] * 2, exclude_buyers=True,
    )
    oracle = _Fixed([[0, 0, 0, 0, 1, 1], [1, 0, 0, 0, 0, 0]])
    noise = _Fixed([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]])
    weights, grid = choose_blend({"model": noise, "oracle": oracle}, task, None, 0.5, "1")
    assert weights == {"model": 0.0, "oracle": 1.0}
    assert grid["val recall@1"].tolist() == [0.0, 0.0, 0.75]  # model weight 1, 0.5, 0; oracle ties split item 0


def _toy_dm():
    """Users 1..4, items 1..4; train before 2020-02-01, test after."""
    t = pd.Timestamp
    rows = [
        # user, item, time, split, price
        (1, 1, t("2020-01-01"), "train", 1.0),
        (1, 2, t("2020-01-05"), "train", 1.0),
        (2, 1, t("2020-01-02"), "train", 5.0),
        (3, 3, t("2020-01-20"), "train", 1.0),
        (3, 3, t("2020-01-21"), "train", 1.0),
        (3, 1, t("2020-01-22"), "train", 1.0),
        (1, 4, t("2020-02-02"), "test", 1.0),
        (2, 4, t("2020-02-03"), "test", 1.0),
        (3, 4, t("2020-02-03"), "test", 1.0),
        (4, 4, t("2020-02-03"), "test", 1.0),  # user 4 was not active before: not ranked
        (1, 1, t("2020-02-04"), "test", 1.0),  # a repurchase: user 1 bought item 1 before
        (2, 3, t("2020-02-04"), "test", 1.0),
        (1, 3, t("2020-02-05"), "test", 1.0),
    ]
    inter = pd.DataFrame(rows, columns=["user_idx", "item_idx", "timestamp", "split", "price"])
    inter = inter.sort_values(["user_idx", "timestamp"], kind="stable").reset_index(drop=True)
    cat = torch.tensor([[0, 0], [1, 1], [1, 1], [2, 1], [1, 2]])  # (N+1, F): item 4 shares field 0 with 1, 2
    return SimpleNamespace(
        interactions=inter,
        users=pd.DataFrame({"user_idx": [1, 2, 3, 4]}),
        item_features=SimpleNamespace(
            is_cold=torch.tensor([True, False, False, False, True]), categorical=cat
        ),
        manifest={
            "split": {"method": "temporal", "test_start": "2020-02-01"},
            "features": {"categorical": {"category": 3, "brand": 3}},
        },
    )


def test_task_takes_the_window_buyers_of_customers_active_before():
    dm = _toy_dm()
    task = audience_task(dm, "test", min_buyers=2)
    assert task.customers.tolist() == [1, 2, 3]
    # item 4: users 1, 2, 3 (user 4 was not active before); item 3: users 1, 2 (user 3 bought it before,
    # not in the test); item 1: only user 1, a past buyer, left out.
    assert task.items.tolist() == [3, 4]
    assert [b.tolist() for b in task.buyers] == [[0, 1], [0, 1, 2]]
    assert [p.tolist() for p in task.past] == [[2], []]
    assert task.is_cold.tolist() == [False, True]
    kept = audience_task(dm, "test", min_buyers=2, exclude_buyers=False)
    assert kept.items.tolist() == [3, 4]  # item 1 has one buyer either way
    assert audience_task(dm, "test", min_buyers=4).items.tolist() == []


def test_baselines_on_the_toy_window():
    dm = _toy_dm()
    task = audience_task(dm, "test", min_buyers=2)
    pop = CustomerPopularity().fit(task, dm).score(np.array([0, 1]))
    assert pop[0].tolist() == [2, 1, 3]  # purchases before the window
    aff = CategoryAffinity().fit(task, dm).score(np.array([0, 1]))
    # item 3 (category 2): only user 3 bought category 2; item 4 (category 1): users 1 (2 purchases), 2, 3.
    assert np.argmax(aff[0]) == 2
    assert aff[1][0] > aff[1][2] and aff[1][0] > aff[1][1]
    # Ties on category 1 (users 2 and 3, one each) broken by brand (item 4's brand 2: nobody), then by
    # all purchases: user 3 (3) before user 2 (1).
    assert aff[1][2] > aff[1][1]
    rfm = RFMAudience().fit(task, dm).score(np.array([0]))
    assert np.argmax(rfm[0]) == 2  # user 3: most recent and most frequent


def test_summary_slices_warm_and_cold_items():
    task = SimpleNamespace(
        items=np.array([5, 6, 7]), is_cold=np.array([False, True, False]), buyers=[[1], [1, 2], [3]]
    )
    frame = per_item_frame(task, {"precision@1": np.array([1.0, 0.0, 0.5])})
    s = summarize(frame)
    assert s["all"] == {"items": 3, "precision@1": 0.5}
    assert s["warm_items"] == {"items": 2, "precision@1": 0.75}
    assert s["cold_items"] == {"items": 1, "precision@1": 0.0}


def test_eval_task_audience_end_to_end(tiny_ckpt, tmp_path):
    """``towerrec-eval task=audience`` on the tiny checkpoint: the model and every baseline on the same
    items, paired tests over them, one-line refusal when no item qualifies."""
    from conftest import compose_cfg

    from towerrec.commands.evaluate import evaluate

    cfg = compose_cfg(
        "eval",
        [f"ckpt_path={tiny_ckpt}", "task=audience", "task.min_buyers=2", "out_dir=" + str(tmp_path)],
        tmp_path,
    )
    results = evaluate(cfg)
    assert set(results) == {"two_tower", "rfm", "category_affinity", "customer_popularity", "random", "blend"}
    record = read_results(tmp_path / "metrics.json")  # the one results record, kind audience
    assert record.kind == "audience" and record.split == "test"
    assert {n: m.role for n, m in record.models.items()} == {
        "two_tower": "trained", "rfm": "baseline", "category_affinity": "baseline",
        "customer_popularity": "baseline", "random": "baseline", "blend": "blend",
    }
    assert {n: m.metrics for n, m in record.models.items()} == results
    out = record.header
    weights = out["blend"]["weights"]  # chosen on the validation window, over the model and two baselines
    assert set(weights) == {"two_tower", "category_affinity", "rfm"} and sum(weights.values()) == pytest.approx(1)
    grid = pd.DataFrame(out["blend"]["val_grid"])
    assert len(grid) == 15 and grid["val recall@100"].max() == pytest.approx(
        grid.set_index(["two_tower", "category_affinity", "rfm"]).loc[tuple(weights.values()), "val recall@100"]
    )
    assert out["items"] > 0 and results["two_tower"]["all"]["items"] == out["items"]
    table = load_results(tmp_path)  # towerrec-compare's reader takes it: share cut-offs keep their label
    assert set(table["k"]) == {10, 50, 100, "1%", "5%", "10%"}
    row = table[(table["model"] == "two_tower") & (table["slice"] == "all") & (table["metric"] == "recall") & (table["k"] == 100)]
    assert row["value"].item() == results["two_tower"]["all"]["recall@100"] and row["users"].item() == out["items"]
    frame = pd.read_parquet(tmp_path / "two_tower" / "audience_per_item.parquet")
    assert len(frame) == out["items"]
    assert (frame["all/recall@100"] <= 1).all() and (frame["all/precision@10"] >= 0).all()
    paired = pd.read_csv(tmp_path / "audience_paired.csv")
    assert set(paired["b"]) == {"rfm", "category_affinity", "customer_popularity", "random", "blend"}
    assert (paired["a"] == "two_tower").all()
    cfg = compose_cfg(
        "eval", [f"ckpt_path={tiny_ckpt}", "task=audience", "task.min_buyers=100000"], tmp_path / "none"
    )
    with pytest.raises(ValueError, match="lower task.min_buyers"):
        evaluate(cfg)
