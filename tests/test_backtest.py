"""Rolling backtests end to end on tiny synthetic data: towerrec-reproduce (train + eval) over 2 folds."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_DATA, TINY_TRAIN, compose_cfg

from towerrec.commands.evaluate import evaluate
from towerrec.commands.reproduce import reproduce
from towerrec.evaluation.per_user import read_per_user, write_per_user
from towerrec.evaluation.report import pooled_per_user
from towerrec.evaluation.results import read_results
from towerrec.evaluation.stats import compare_per_user

ROLLING = ["data.split.method=rolling", "+data.split.folds=2", "+data.split.window_days=5", "data.split.val_days=4"]


@pytest.fixture(scope="module")
def backtest(tmp_path_factory) -> Path:
    """towerrec-reproduce with the rolling split: one experiment, one seed, two baselines."""
    root = tmp_path_factory.mktemp("backtest")
    train = [*TINY_DATA, f"data.processed_dir={root / 'data'}", *ROLLING, *TINY_TRAIN]
    quoted = ",".join(f'"{o}"' for o in train)
    out = root / "out"
    overrides = ["experiments=[synthetic_fusion]", "seeds=[0]", "baselines=[popularity,repurchase]", f"train_overrides=[{quoted}]"]
    reproduce(compose_cfg("reproduce", overrides, out))
    return out


def _fold_users(folder: Path) -> int:
    return len(read_per_user(folder)[0])


def test_train_writes_every_fold_and_the_pooled_result(backtest):
    run = backtest / "runs" / "synthetic_fusion" / "seed0"
    metrics = read_results(run / "metrics.json")
    assert metrics.kind == "backtest" and metrics.data["split"]["method"] == "rolling"
    folds = metrics.folds
    assert [f["fold"] for f in folds] == [0, 1]
    assert folds[0]["split"]["test_end"] == folds[1]["split"]["test_start"]
    per_fold = [read_results(run / f"fold{f}" / "metrics.json").scores() for f in (0, 1)]
    assert [f["models"]["two_tower"] for f in folds] == per_fold
    users = [m["all"]["users"] for m in per_fold]
    assert all(n > 0 for n in users)
    pooled, meta = read_per_user(run)
    assert list(pooled.columns[:2]) == ["fold", "user_idx"]
    assert pooled.groupby("fold").size().tolist() == users
    pooled_all = metrics.scores()["all"]
    assert pooled_all["users"] == sum(users)
    # The pooled figure is the mean over (fold, user) pairs: the folds' means weighted by their users.
    weighted = sum(m["all"]["recall@20"] * n for m, n in zip(per_fold, users, strict=True)) / sum(users)
    assert pooled_all["recall@20"] == pytest.approx(weighted)
    lo, hi = pooled_all["recall_lo@20"], pooled_all["recall_hi@20"]
    assert lo <= pooled_all["recall@20"] <= hi
    assert meta["data"]["config_hash"] == metrics.data["config_hash"]


def test_eval_pools_every_baseline_and_pairs_on_fold_and_user(backtest):
    base = backtest / "baselines"
    pop, _ = read_per_user(base / "popularity")
    rep, _ = read_per_user(base / "repurchase")
    assert pop.groupby("fold").size().tolist() == [_fold_users(base / f"fold{f}" / "popularity") for f in (0, 1)]
    # A user evaluated in both folds is two pairs, and those pairs must not be crossed between folds.
    assert pop["user_idx"].duplicated().any()
    table = compare_per_user(pop, rep, ["all"], ["recall@20"])
    assert table["users"].iloc[0] == len(pop)
    diff = (pop["all/recall@20"] - rep["all/recall@20"]).mean()
    assert table["mean_diff"].iloc[0] == pytest.approx(diff)
    summary = read_results(base / "metrics.json")
    assert summary.kind == "backtest" and set(summary.models) == {"popularity", "repurchase"}
    assert len(summary.folds) == 2
    assert "fold 1" in (base / "backtest.md").read_text()


def test_reproduce_prints_per_fold_and_pooled_rows_with_paired_tests(backtest):
    result = read_results(backtest / "reproduce.json")
    header = result.header
    assert header["split"]["method"] == "rolling"
    assert [f["fold"] for f in header["split"]["fold_splits"]] == [0, 1]
    model = result.models["synthetic_fusion"]
    vs = model.details["vs_best"]["all"]
    assert vs["users"] == model.metrics["all"]["users"]  # paired over every (fold, user) pair
    assert 0 < vs["p_value"] <= 1 and not math.isnan(vs["mean_diff"])
    md = (backtest / "reproduce.md").read_text()
    assert "## Per fold: Recall@20" in md
    section = md.split("## Per fold: Recall@20")[1]
    assert "fold 0 (" in section and "fold 1 (" in section and "pooled" in section
    for name in ("synthetic_fusion", "popularity", "repurchase"):
        (row,) = [line for line in section.splitlines() if line.startswith(f"| {name} ")]
        if name == "synthetic_fusion":
            assert f"({int(model.metrics['all']['users'])})" in row


def test_single_baseline_backtest_and_checkpoint_refused(backtest, tmp_path):
    data = backtest.parent / "data"
    cfg = compose_cfg("eval", [*TINY_DATA, f"data.processed_dir={data}", *ROLLING, "baseline=popularity", f"out_dir={tmp_path}"], tmp_path)
    pooled = evaluate(cfg)
    frame, meta = read_per_user(tmp_path)
    assert meta["model"] == "popularity" and len(frame) == pooled["popularity"]["all"]["users"]
    ref, _ = read_per_user(backtest / "baselines" / "popularity")
    pd.testing.assert_frame_equal(frame, ref)  # the same folds: the same per-(fold, user) values
    cfg = compose_cfg("eval", [*TINY_DATA, f"data.processed_dir={data}", *ROLLING, "ckpt_path=x.ckpt"], tmp_path)
    with pytest.raises(ValueError, match="ckpt_path: a checkpoint is trained on one fold"):
        evaluate(cfg)


@pytest.mark.slow  # two more single-fold runs; the pooled writer's pieces have quick tests in evaluation/
def test_audiences_on_every_fold_with_that_folds_model_pooled_over_fold_item_pairs(backtest, tmp_path):
    """``towerrec-eval task=audience`` on the rolling split: each fold ranks with the checkpoint its own
    fold trained, and the pooled table and paired tests run over every (fold, item) pair."""
    data = backtest.parent / "data"
    run = backtest / "runs" / "synthetic_fusion" / "seed0"
    overrides = [*TINY_DATA, f"data.processed_dir={data}", *ROLLING, "task=audience", "task.min_buyers=2"]
    cfg = compose_cfg("eval", [*overrides, f"ckpt_path={run}", f"out_dir={tmp_path}"], tmp_path)
    pooled = evaluate(cfg)
    assert {"two_tower", "rfm", "category_affinity", "blend"} <= set(pooled)
    record = read_results(tmp_path / "metrics.json")
    assert record.kind == "audience" and set(record.models) == set(pooled)
    out = record.header
    folds = [read_results(tmp_path / f"fold{f}" / "metrics.json") for f in (0, 1)]
    folds = [{**f.header, "models": {n: m.metrics for n, m in f.models.items()}} for f in folds]
    assert out["items"] == sum(f["items"] for f in folds) == pooled["two_tower"]["all"]["items"]
    frame = pd.read_parquet(tmp_path / "two_tower" / "audience_per_item.parquet")
    assert frame.groupby("fold").size().tolist() == [f["items"] for f in folds]
    # Each fold ranked with its own fold's model: the fold's figure is that checkpoint's own run.
    for f in (0, 1):
        best = read_results(run / f"fold{f}" / "metrics.json").run["best_checkpoint"]
        one = compose_cfg("eval", [*overrides, f"+data.split.fold={f}", f"ckpt_path={best}", f"out_dir={tmp_path / 'one'}"], tmp_path)
        assert evaluate(one)["two_tower"]["all"] == folds[f]["models"]["two_tower"]["all"]
    paired = pd.read_csv(tmp_path / "audience_paired.csv")
    assert (paired.loc[paired["slice"] == "all", "users"] == out["items"]).all()  # over every (fold, item) pair
    weighted = sum(f["models"]["two_tower"]["all"]["recall@100"] * f["items"] for f in folds) / out["items"]
    assert pooled["two_tower"]["all"]["recall@100"] == pytest.approx(weighted)
    with pytest.raises(ValueError, match="pass the folder of a rolling towerrec-train run"):
        evaluate(compose_cfg("eval", [*overrides, "ckpt_path=x.ckpt", f"out_dir={tmp_path / 'x'}"], tmp_path))


def test_pairs_are_fold_and_user(tmp_path):
    """A user evaluated in two folds is two pairs: tables are matched on (fold, user_idx), never crossed."""
    a = pd.DataFrame({"fold": [0, 0, 1, 1], "user_idx": [1, 2, 1, 2], "all/recall@20": [1.0, 0.0, 0.5, 0.0]})
    b = a.iloc[::-1].assign(**{"all/recall@20": [0.0, 0.0, 0.5, 0.25]})  # rows in another order
    table = compare_per_user(a, b, ["all"])
    # Matched pairs: (0,1) 1-0.25, (0,2) 0-0.5, (1,1) 0.5-0, (1,2) 0-0 -> mean 0.1875.
    assert table["users"].iloc[0] == 4 and table["mean_diff"].iloc[0] == pytest.approx(0.1875)
    with pytest.raises(ValueError, match="fold column"):
        compare_per_user(a, a.drop(columns="fold").drop_duplicates("user_idx"), ["all"])
    data = {"name": "x", "config_hash": "h"}
    write_per_user(a, tmp_path / "ok.parquet", "m", "test", data)
    assert read_per_user(tmp_path / "ok.parquet")[0].equals(a)
    write_per_user(pd.concat([a, a.iloc[:1]]), tmp_path / "twice.parquet", "m", "test", data)
    with pytest.raises(ValueError, match="fold/user_idx 0/1 appears twice"):
        read_per_user(tmp_path / "twice.parquet")
    # Over seeds, each (fold, user) pair is averaged on its own.
    mean = pooled_per_user([a, b.sort_values(["fold", "user_idx"])])
    assert mean["all/recall@20"].tolist() == pytest.approx([0.625, 0.25, 0.25, 0.0])
