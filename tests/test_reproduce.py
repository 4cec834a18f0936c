"""towerrec-reproduce on tiny synthetic data: 2 experiments x 2 seeds and 2 baselines, one table."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_DATA, TINY_TRAIN, compose_cfg

from towerrec import PROJECT_ROOT
from towerrec.commands.reproduce import reproduce
from towerrec.evaluation.report import (
    best_baseline,
    compare_to_baseline,
    format_reproduce_table,
    load_results,
    mean_std,
    pooled_intervals,
)
from towerrec.evaluation.results import ModelResult, read_results

EXPERIMENTS = ["synthetic_fusion", "synthetic_no_image"]
BASELINES = ["popularity", "repurchase"]
SEEDS = [0, 1]


def tiny_overrides(root: Path) -> list[str]:
    """Reproduce-config overrides: the tiny runs above, data processed under ``root``."""
    train = [*TINY_DATA, f"data.processed_dir={root / 'data'}", *TINY_TRAIN]
    quoted = ",".join(f'"{o}"' for o in train)  # list items holding "=" must be quoted
    return [
        f"experiments=[{','.join(EXPERIMENTS)}]",
        f"seeds=[{','.join(map(str, SEEDS))}]",
        f"baselines=[{','.join(BASELINES)}]",
        f"train_overrides=[{quoted}]",
    ]


def reproduce_tiny(root: Path) -> Path:
    """The tiny reproduction's output folder, ``root/out``; run once, later calls reuse it."""
    out = root / "out"
    if not (out / "reproduce.json").is_file():
        reproduce(compose_cfg("reproduce", tiny_overrides(root), out))
    return out


@pytest.fixture
def tiny_reproduction(tmp_path_factory) -> Path:
    return reproduce_tiny(tmp_path_factory.getbasetemp() / "reproduce_tiny")


def test_table_has_header_and_a_mean_std_row_per_model(tiny_reproduction):
    md = (tiny_reproduction / "reproduce.md").read_text()
    manifest = json.loads((tiny_reproduction.parent / "data" / "manifest.json").read_text())
    head = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert manifest["config_hash"] in md
    if head.returncode == 0:
        assert head.stdout.strip() in md
    assert "**wall time**" in md and "**split**: temporal" in md and "**seeds**: 0, 1" in md
    assert "**intervals**" in md and f"= {20 / manifest['counts']['items']:.4f}" in md  # chance level
    assert "**paired tests**" in md
    header, rows = table_rows(md)
    assert header[:3] == ["slice", "model", "users"] and "MAP@12" in header
    (vs,) = [c for c in header if c.startswith("vs ")]
    best = vs.removeprefix("vs ").split(":")[0]
    assert best in BASELINES and vs == f"vs {best}: ΔRecall@20 (p)"
    for sl in ("all", "warm_items", "cold_items"):
        for name in EXPERIMENTS:
            (row,) = [r for r in rows if r[:2] == [sl, name]]
            assert sum("±" in c for c in row) >= 3  # recall, NDCG, MRR (coverage only in "all")
            assert row[header.index("Recall@20 95% interval")].endswith("]")
            verdict = row[header.index(vs)]
            assert re.fullmatch(r"[+-]\d\.\d{4} \(p = \d\.\d{4}\) (better|worse|not distinguishable)", verdict), verdict
        for name in BASELINES:
            (row,) = [r for r in rows if r[:2] == [sl, name]]
            assert not any("±" in c for c in row)
            if name == best:
                assert row[header.index(vs)] == "best baseline"
    assert len(rows) == 3 * (len(EXPERIMENTS) + len(BASELINES))


def table_rows(md: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the rows' cells of the markdown table in ``md``."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def test_json_holds_metrics_in_range_and_means_of_the_runs(tiny_reproduction):
    result = read_results(tiny_reproduction / "reproduce.json")
    assert result.kind == "reproduce" and result.split == "test"
    assert result.header["seeds"] == SEEDS
    assert result.header["git"]["commit"]
    assert set(result.models) == {*EXPERIMENTS, *BASELINES}
    for name, model in result.models.items():
        for sl in ("all", "warm_items", "cold_items"):
            for metric in ("recall@20", "ndcg@20", "mrr@20"):
                assert 0.0 <= model.metrics[sl][metric] <= 1.0, (name, sl, metric)
        assert 0.0 < model.metrics["all"]["coverage@20"] <= 1.0
    for name in EXPERIMENTS:
        model = result.models[name]
        assert model.role == "trained" and [r["seed"] for r in model.details["runs"]] == SEEDS
        runs = [read_results(tiny_reproduction / r["dir"] / "metrics.json") for r in model.details["runs"]]
        recalls = [run.scores()["all"]["recall@20"] for run in runs]
        assert model.metrics["all"]["recall@20"] == pytest.approx(sum(recalls) / 2)
        assert model.std["all"]["recall@20"] == pytest.approx(abs(recalls[0] - recalls[1]) / math.sqrt(2))
    for name, model in result.models.items():  # a 95% interval over users brackets every mean
        for sl in ("all", "warm_items", "cold_items"):
            lo, hi = model.interval[sl]["recall@20"]
            assert lo <= model.metrics[sl]["recall@20"] <= hi, (name, sl)
    # Paired tests against the best baseline by Recall@20 of "all": the mean difference over the users is
    # the difference of the means (every test user is in every run), the p-value a probability.
    best = result.header["comparison"]["baseline"]
    recall = {n: m.metrics["all"]["recall@20"] for n, m in result.models.items()}
    assert best == max(BASELINES, key=recall.get)
    for name, model in result.models.items():
        if name == best:
            assert "vs_best" not in model.details
            continue
        for sl in ("all", "warm_items", "cold_items"):
            test = model.details["vs_best"][sl]
            assert 0.0 < test["p_value"] <= 1.0 and test["verdict"] in ("better", "worse", "not distinguishable")
            assert test["lo"] <= test["mean_diff"] <= test["hi"]
        assert model.details["vs_best"]["all"]["mean_diff"] == pytest.approx(recall[name] - recall[best])
        assert model.details["vs_best"]["all"]["users"] == model.metrics["all"]["users"]
        assert 0.0 <= model.metrics["all"]["map@12"] <= 1.0
    assert result.models["synthetic_no_image"].details["overrides"][-1] == "model.item_tower.image_encoder=null"
    # The baselines ran through towerrec-eval, which wrote its own files.
    assert (tiny_reproduction / "baselines" / "metrics.md").is_file()


def test_load_results_reads_reproduce_eval_and_train_outputs(tiny_reproduction):
    # A folder of run folders resolves to the newest one holding results.
    repro = load_results(tiny_reproduction.parent)
    assert list(dict.fromkeys(repro["model"])) == [*EXPERIMENTS, *BASELINES]
    assert set(repro["k"]) == {10, 12, 20, 50}
    assert repro[repro["kind"] == "trained"]["std"].notna().any()
    assert any(repro["slice"].str.startswith("history="))
    evaluated = load_results(tiny_reproduction / "baselines")
    assert set(evaluated["model"]) == set(BASELINES) and set(evaluated["kind"]) == {"baseline"}
    trained = load_results(tiny_reproduction / "runs" / EXPERIMENTS[0] / "seed0")
    assert set(trained["model"]) == {"two_tower"} and trained["std"].isna().all()


def test_experiments_on_different_data_fail_before_any_training(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("experiments=")]
    other_data = (
        '+variants.other_shop=["experiment=synthetic","data.source.seed=7"]'  # a variant from the CLI
    )
    cfg = compose_cfg(
        "reproduce", [*overrides, other_data, "experiments=[synthetic_fusion,other_shop]"], tmp_path / "out"
    )
    with pytest.raises(ValueError, match="share one data config"):
        reproduce(cfg)
    cfg = compose_cfg("reproduce", [*overrides, "experiments=[no_such_experiment]"], tmp_path / "out")
    with pytest.raises(ValueError, match="unknown experiment 'no_such_experiment'"):
        reproduce(cfg)
    assert not (tmp_path / "out" / "runs").exists() and not (tmp_path / "data").exists()


def test_mean_std_and_table_cells():
    mean, std = mean_std([{"all": {"recall@20": 0.2, "users": 10}}, {"all": {"recall@20": 0.4, "users": 10}}])
    assert mean["all"]["recall@20"] == pytest.approx(0.3)
    assert std["all"]["recall@20"] == pytest.approx(math.sqrt(0.02))
    models = {
        "two_tower": ModelResult("trained", mean, std),
        "popularity": ModelResult("baseline", {"all": {"recall@20": 0.1, "users": 10, "mrr@20": math.nan}}),
    }
    header, rows = table_rows(format_reproduce_table(models, ["all", "cold_items"], k=20))
    assert header == ["slice", "model", "users", "Recall@20", "NDCG@20", "MRR@20", "MAP@12", "coverage@20", "Recall@20 95% interval"]
    assert rows == [
        ["all", "two_tower", "10", "0.3000 ± 0.1414", "–", "–", "–", "–", "–"],
        ["all", "popularity", "10", "0.1000", "–", "–", "–", "–", "–"],
    ]  # no cold_items slice in either model
    models["popularity"].interval = {"all": {"recall@20": [0.05, 0.15]}}
    models["two_tower"].details["vs_best"] = {"all": {"mean_diff": 0.2, "p_value": 0.0312, "verdict": "better"}}
    header, rows = table_rows(format_reproduce_table(models, ["all"], k=20, vs="popularity"))
    assert header[-1] == "vs popularity: ΔRecall@20 (p)"
    assert rows[0][-1] == "+0.2000 (p = 0.0312) better"
    assert rows[1][-2:] == ["[0.0500, 0.1500]", "best baseline"]


def test_best_baseline_and_paired_comparison_by_hand():
    models = {
        "fusion": ModelResult("trained", {"all": {"recall@20": 0.9}}),
        "popularity": ModelResult("baseline", {"all": {"recall@20": 0.2}}),
        "repurchase": ModelResult("baseline", {"all": {"recall@20": 0.3}}),
        "random": ModelResult("baseline", {"all": {"recall@20": math.nan}}),
    }
    assert best_baseline(models, "recall@20") == "repurchase"
    assert best_baseline({"fusion": models["fusion"]}, "recall@20") is None
    per_user = {
        # fusion's users 1..3 against repurchase's 2..4: users 2 and 3 are paired, d = (1, 1)
        "fusion": pd.DataFrame({"user_idx": [1, 2, 3], "all/recall@20": [0.0, 1.0, 1.0]}),
        "repurchase": pd.DataFrame({"user_idx": [2, 3, 4], "all/recall@20": [0.0, 0.0, 1.0]}),
    }
    out = compare_to_baseline(per_user, "repurchase", "recall@20", ["all", "cold_items"])
    assert list(out) == ["fusion"] and list(out["fusion"]) == ["all"]  # no cold_items column
    test = out["fusion"]["all"]
    assert test["users"] == 2 and test["mean_diff"] == 1.0
    assert test["p_value"] == pytest.approx(2 / 4) and test["verdict"] == "not distinguishable"  # sums 2, 0, 0, -2


def test_pooled_intervals_average_each_user_over_seeds_first():
    # Two seeds; user 2 has no cold target (NaN) and is left out of that slice.
    seed0 = pd.DataFrame({"user_idx": [1, 2, 3], "all/recall@20": [1.0, 0.0, 0.0], "cold_items/recall@20": [1.0, math.nan, 0.0]})
    seed1 = pd.DataFrame({"user_idx": [3, 2, 1], "all/recall@20": [0.0, 0.0, 0.0], "cold_items/recall@20": [0.0, math.nan, 0.0]})
    out = pooled_intervals([seed0, seed1], [20])
    # Per user over seeds: all = [0.5, 0, 0], cold = [0.5, 0]: every resampled mean lies in [0, mean of 0.5s].
    lo, hi = out["all"]["recall@20"]
    assert 0.0 <= lo < 0.5 / 3 < hi <= 0.5
    lo, hi = out["cold_items"]["recall@20"]
    assert lo == 0.0 and hi == 0.5
    assert "ndcg@20" not in out["all"]  # only the columns the runs wrote


@pytest.mark.parametrize("preset", ["synthetic", "hm", "hm_30d"])
def test_every_preset_composes_its_ablations_on_one_data_config(preset, tmp_path):
    """Each preset's runs compose (no typo in a variant) and differ from the first only where they ablate."""
    from towerrec.commands.reproduce import compose_runs
    from towerrec.data.settings import config_hash

    cfg = compose_cfg("reproduce", [f"preset={preset}", "seeds=[0]"], tmp_path / "out")
    runs = {name: run for name, _, run in compose_runs(cfg, tmp_path / "out", [10, 12, 20])}
    assert len({config_hash(run.data) for run in runs.values()}) == 1
    parts = ("id_encoder", "image_encoder", "content_encoder", "sketch")
    kept = {name: {p for p in parts if run.model.item_tower.get(p) is not None} for name, run in runs.items()}
    fused = next(iter(runs))
    for name, run in runs.items():
        if name.endswith("_no_text"):
            assert kept[name] == kept[fused] and run.model.item_tower.content_encoder.text_buckets == 0
        for part, suffix in (("image_encoder", "_no_image"), ("sketch", "_no_sketch"), ("id_encoder", "_no_id"), ("content_encoder", "_no_content")):
            if name.endswith(suffix):
                assert kept[name] == kept[fused] - {part}
