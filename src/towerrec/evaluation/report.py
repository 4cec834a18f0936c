"""Reporting of ``towerrec-reproduce``: the tables, the paired tests, and the results reader.

:mod:`towerrec.commands.reproduce` runs the experiments; this module turns what they wrote into ``reproduce.md``
and reads every results file back. It imports neither Lightning nor the models, so a notebook or a
script can read results (:func:`load_results`, public API) without the training stack.

- :func:`mean_std`, :func:`pooled_per_user`, :func:`pooled_intervals`: trained models over seeds;
- :func:`best_baseline`, :func:`compare_to_baseline`: each model against the best baseline, paired over
  the test users (:mod:`towerrec.evaluation.stats`);
- :func:`format_header`, :func:`format_reproduce_table`: the markdown of ``reproduce.md``;
- :func:`results_file`, :func:`load_results`: a reproduce, eval or train output as one long table.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pandas as pd

from towerrec.evaluation.evaluator import frame_metrics
from towerrec.evaluation.per_user import pair_keys, read_per_user
from towerrec.evaluation.results import ModelResult, Results, read_results
from towerrec.evaluation.stats import N_FLIPS, paired_difference
from towerrec.fileio import markdown_table

Slices = dict[str, dict[str, float]]

#: Metrics of the table at ``cfg.k``; coverage exists for the ``all`` slice only. MAP has its own cut-off.
TABLE_METRICS = [("recall", "Recall"), ("ndcg", "NDCG"), ("mrr", "MRR"), ("coverage", "coverage")]
#: The cut-off of the table's MAP column: MAP@12 is the H&M competition's metric.
MAP_K = 12


# ----------------------------------------------------------------------------- over seeds
def mean_std(runs: list[Slices]) -> tuple[Slices, Slices]:
    """Mean and sample standard deviation of every slice's metrics over runs (NaN where undefined)."""
    mean: Slices = {}
    std: Slices = {}
    for sl in dict.fromkeys(s for run in runs for s in run):
        names = dict.fromkeys(m for run in runs for m in run.get(sl, {}))
        mean[sl], std[sl] = {}, {}
        for m in names:
            values = [run.get(sl, {}).get(m) for run in runs]
            values = [math.nan if v is None else float(v) for v in values]
            mean[sl][m] = statistics.fmean(values)
            std[sl][m] = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def pooled_per_user(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Each user's metrics averaged over runs (seeds): ``user_idx`` and ``<slice>/<metric>@k`` columns.

    Args:
        frames: one ``test_per_user.parquet`` table per run. NaN (no target in the slice) stays NaN.
    """
    return pd.concat(frames).groupby(pair_keys(frames[0]), as_index=False).mean()


def pooled_intervals(frames: list[pd.DataFrame], ks: list[int]) -> dict[str, dict[str, list[float]]]:
    """95% bootstrap intervals over users of each user's metric averaged over runs (seeds).

    Args:
        frames: one ``test_per_user.parquet`` table per run (``user_idx`` and ``<slice>/<metric>@k``).
        ks: cut-offs.

    Returns:
        ``{slice: {metric@k: [low, high]}}`` for :data:`ITEM_SLICES` x ``evaluator.INTERVAL_METRICS``.
    """
    return interval_pairs(frame_metrics(pooled_per_user(frames), ks))


def interval_pairs(slices: Slices) -> dict[str, dict[str, list[float]]]:
    """``{slice: {metric@k: [low, high]}}`` from the ``recall_lo@k``, ``recall_hi@k``... keys that
    :func:`~towerrec.evaluation.evaluator.intervals` writes (a baseline's slices carry them too)."""
    out: dict[str, dict[str, list[float]]] = {}
    for sl, values in slices.items():
        for key, lo in values.items():
            if "_lo@" in key:
                metric, k = key.split("_lo@")
                out.setdefault(sl, {})[f"{metric}@{k}"] = [lo, values.get(f"{metric}_hi@{k}", math.nan)]
    return out


# ----------------------------------------------------------------------------- against the best baseline
def best_baseline(models: dict[str, ModelResult], metric: str) -> str | None:
    """The baseline with the highest ``metric`` in the ``all`` slice (None without baselines)."""
    scores = {name: m.metrics.get("all", {}).get(metric) for name, m in models.items() if m.role == "baseline"}
    scores = {name: v for name, v in scores.items() if v is not None and v == v}
    return max(scores, key=scores.get) if scores else None


def read_baseline_per_user(folder: Path, name: str) -> pd.DataFrame:
    """A baseline's per-user test results from towerrec-eval's output ``folder`` (one scorer or several)."""
    frame, meta = read_per_user(folder / name if (folder / name).is_dir() else folder)
    if meta["model"] != name:
        raise ValueError(f"{folder}: per-user results of {meta['model']!r}, expected {name!r}")
    return frame


def compare_to_baseline(
    per_user: dict[str, pd.DataFrame], baseline: str, metric: str, slices: list[str], n_flips: int = N_FLIPS
) -> dict[str, dict[str, dict]]:
    """Each model's paired difference to ``baseline`` in ``metric``, per slice.

    Args:
        per_user: per-user tables by model (a trained model's averaged over seeds, :func:`pooled_per_user`).
        baseline: the name of the reference in ``per_user``.
        metric: e.g. ``recall@20``.
        slices: e.g. ``["all", "warm_items", "cold_items"]``.

    Returns:
        ``{model: {slice: PairedDifference.as_dict()}}`` for every model but the baseline; users are
        matched on ``user_idx``.
    """
    ref = per_user[baseline]
    out: dict[str, dict[str, dict]] = {}
    for name, frame in per_user.items():
        if name == baseline:
            continue
        joined = frame.merge(ref, on=pair_keys(ref), suffixes=("", "/ref"))
        for sl in slices:
            column = f"{sl}/{metric}"
            if column in joined and f"{column}/ref" in joined:
                diff = paired_difference(joined[column].to_numpy(), joined[f"{column}/ref"].to_numpy(), n_flips=n_flips)
                out.setdefault(name, {})[sl] = diff.as_dict()
    return out


def _comparison_cell(comparison: dict | None) -> str | None:
    if not comparison or comparison.get("p_value") is None or comparison["p_value"] != comparison["p_value"]:
        return None
    return f"{comparison['mean_diff']:+.4f} (p = {comparison['p_value']:.4f}) {comparison['verdict']}"


# ----------------------------------------------------------------------------- markdown
def _interval_cell(interval: list[float] | None) -> str | None:
    if not interval or any(v is None or v != v for v in interval):
        return None
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _cell(value: float | None, std: float | None) -> str | None:
    if value is None or value != value:
        return None
    if std is None or std != std:
        return f"{value:.4f}"
    return f"{value:.4f} ± {std:.4f}"


def format_reproduce_table(models: dict[str, ModelResult], slices: list[str], k: int, vs: str | None = None) -> str:
    """A markdown table: one row per (slice, model), the metrics at ``k`` and MAP@12, ``mean ± std`` where
    known, the 95% interval of Recall@k over users and, with ``vs`` (the best baseline's name), each
    model's paired difference to it (``details["vs_best"][slice]``, see :func:`compare_to_baseline`)."""
    rows = []
    for sl in slices:
        for name, model in models.items():
            values = model.metrics.get(sl)
            if values is None:
                continue
            stds = model.std.get(sl, {})
            users = values.get("users")
            row = {"slice": sl, "model": name, "users": None if users is None or users != users else int(users)}
            for m, label in TABLE_METRICS[:3]:
                row[f"{label}@{k}"] = _cell(values.get(f"{m}@{k}"), stds.get(f"{m}@{k}"))
            row[f"MAP@{MAP_K}"] = _cell(values.get(f"map@{MAP_K}"), stds.get(f"map@{MAP_K}"))
            for m, label in TABLE_METRICS[3:]:
                row[f"{label}@{k}"] = _cell(values.get(f"{m}@{k}"), stds.get(f"{m}@{k}"))
            row[f"Recall@{k} 95% interval"] = _interval_cell(model.interval.get(sl, {}).get(f"recall@{k}"))
            if vs is not None:
                cell = "best baseline" if name == vs else _comparison_cell(model.details.get("vs_best", {}).get(sl))
                row[f"vs {vs}: ΔRecall@{k} (p)"] = cell
            rows.append(row)
    return markdown_table(rows)


def format_fold_table(per_user: dict[str, pd.DataFrame], metric: str, split: dict) -> str:
    """A rolling backtest's markdown table: each model's ``metric`` of ``all`` per fold and pooled.

    Args:
        per_user: per-user tables with a ``fold`` column, by model (a trained model's averaged over seeds).
        metric: e.g. ``recall@20``.
        split: the pooled split info (``fold_splits`` with each fold's test window).
    """
    column = f"all/{metric}"
    rows = []
    for name, frame in per_user.items():
        if column not in frame or "fold" not in frame:
            continue
        by_fold = frame.groupby("fold")[column]
        row = {"model": name}
        for info in split["fold_splits"]:
            f = info["fold"]
            mean = by_fold.mean().get(f, math.nan)
            users = int(by_fold.count().get(f, 0))
            row[f"fold {f} ({info['test_start']})"] = f"{mean:.4f} ({users})"
        row["pooled"] = f"{frame[column].mean():.4f} ({int(frame[column].count())})"
        rows.append(row)
    return markdown_table(pd.DataFrame(rows))


def duration(seconds: float) -> str:
    """``"3 min 5 s"`` or ``"42 s"``."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def format_header(header: dict) -> str:
    """The markdown lines above the table: data, commit, wall time, split, seeds, runs."""
    data, git, split = header["data"], header["git"], header["split"]
    lines = [
        f"# Reproduction: {data['name']}, {split['name']} split, full ranking",
        "",
        f"- **data hash** (manifest config_hash): `{data['config_hash']}`",
    ]
    for path, inp in data["inputs"].items():
        kind = "listing sha256" if inp["folder"] else "sha256"
        lines.append(f"  - `{Path(path).name}` {kind} `{inp['sha256']}` ({inp['bytes']:,} bytes)")
    if data["generator"]:
        params = ", ".join(f"{key}={value}" for key, value in data["generator"].items())
        lines.append(f"  - generated: {params}")
    dirty = {True: " (dirty: uncommitted changes)", False: "", None: ""}[git["dirty"]]
    lines.append(f"- **commit**: `{git['commit']}`{dirty}")
    env = header["environment"]
    over = " — over budget" if header["wall_seconds"] > 60 * header["budget_minutes"] else ""
    steps = ", ".join(f"{step} {duration(sec)}" for step, sec in header["timings_seconds"].items())
    lines.append(
        f"- **wall time**: {duration(header['wall_seconds'])} ({steps}; budget {header['budget_minutes']} min{over}); "
        f"{env['torch_threads']} torch threads, torch {env['torch']}, python {env['python']}"
    )
    details = ", ".join(f"{key} {value}" for key, value in split.items() if key not in ("name", "method", "fold_splits"))
    lines.append(f"- **split**: {split['method']}" + (f" ({details})" if details else ""))
    units = "(fold, user) pairs" if split["method"] == "rolling" else "users"
    seeds = header["seeds"]
    spread = "mean ± sample std over seeds" if len(seeds) > 1 else "one run each"
    lines.append(f"- **seeds**: {', '.join(map(str, seeds))} — trained models: {spread}; baselines: one run")
    for name, overrides in header["experiments"].items():
        lines.append(f"  - `{name}`: `{' '.join(overrides)}`")
    lines.append(
        f"- **intervals**: 95% percentile bootstrap over the test {units} (1,000 resamples), of each user's "
        "value averaged over the seeds for a trained model"
    )
    n_items = data["counts"].get("items")
    if n_items:
        lines.append(
            f"- **chance level**: a random ranking of all {n_items:,} items has an expected Recall@{header['k']} "
            f"of {header['k']} / {n_items:,} = {header['k'] / n_items:.4f} (without seen-item masking)"
        )
    comparison = header.get("comparison")
    if comparison:
        lines.append(
            f"- **paired tests**: every model against the best baseline by {comparison['metric']} of `all`, "
            f"`{comparison['baseline']}`: the mean per-user difference in {comparison['metric']}, a sign-flip "
            f"p-value ({comparison['flips']:,} patterns) over the {units} both have, better / worse at "
            f"p < {comparison['alpha']}, else not distinguishable; a trained model's per-user values are "
            "averaged over the seeds first"
        )
    if header["train_overrides"]:
        lines.append(f"- **every training run**: `{' '.join(header['train_overrides'])}`")
    if header.get("command"):
        lines.append(f"- **command**: `{header['command']}`")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reading results back
def results_file(path: str | Path) -> Path:
    """The results file at ``path``: a ``reproduce.json`` or ``metrics.json``, a folder holding one, or a
    folder of run folders (``outputs/reproduce``), whose newest holding one is taken."""
    path = Path(path)
    if path.is_file():
        return path
    for name in ("reproduce.json", "metrics.json"):
        if (path / name).is_file():
            return path / name
    found = [p for name in ("reproduce.json", "metrics.json") for p in path.glob(f"*/{name}")]
    if not found:
        raise FileNotFoundError(f"{path}: no reproduce.json or metrics.json here or in its subfolders")
    return max(found, key=lambda p: p.stat().st_mtime)


def load_results(path: str | Path) -> pd.DataFrame:
    """Every model's metrics from a towerrec-reproduce, towerrec-eval or towerrec-train output, as a long table.

    Args:
        path: a results file or folder, as :func:`results_file` accepts; the file must be a
            :class:`~towerrec.evaluation.results.Results` record (anything else: a one-line
            ``ResultsError`` naming it).

    Returns:
        Columns ``model``, ``kind`` (trained | baseline), ``slice``, ``users``, ``metric`` (recall, ndcg,
        mrr, hit, coverage, ...), ``k``, ``value`` and ``std`` (NaN for a single run).
    """
    return results_table(read_results(results_file(path)))


def results_table(record: Results) -> pd.DataFrame:
    """A record's metrics as the long table of :func:`load_results`."""
    rows = []
    for name, model in record.models.items():
        kind, stds = model.role, model.std
        for sl, values in model.metrics.items():
            for key, value in values.items():
                if "@" not in key:
                    continue
                metric, k = key.split("@")
                std = stds.get(sl, {}).get(key)
                rows.append(
                    {
                        "model": name,
                        "kind": kind,
                        "slice": sl,
                        # an audience record's units are items, and its cut-offs may be shares ("5%")
                        "users": values.get("users", values.get("items")),
                        "metric": metric,
                        "k": int(k) if k.isdigit() else k,
                        "value": math.nan if value is None else value,
                        "std": math.nan if std is None else std,
                    }
                )
    return pd.DataFrame(rows)
