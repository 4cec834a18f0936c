"""Rolling temporal backtests: every fold of ``data.split.method=rolling``, and the pooled result.

A rolling split (``folds`` K, ``window_days`` W, optional ``val_days``, default W) makes K consecutive
test windows at the end of the data, each with its own validation window right before it
(:func:`~towerrec.data.settings.rolling_cuts`). Fold ``f`` (0 = oldest) is a temporal split with
explicit cut dates in its own processed folder, ``<processed_dir>-rolling<K>x<W>d/fold<f>``, built by
the ordinary prepare step (locking, atomic rename, manifest). Interactions after the fold's test window
are dropped before anything else reads them, and counted in the manifest
(``split.dropped_after_end``): a fold never sees its future, not in training, histories, seen-item
masks or popularity counts. The last fold is the one-window temporal split with ``test_days = W``.

``towerrec-train``, ``towerrec-eval`` and ``towerrec-reproduce`` call into this module when the data
config is rolling. Each fold is an ordinary run in ``<out>/fold<f>/``; the pooled result is the
metrics over every evaluated (fold, user) pair, with bootstrap intervals over those pairs, written
beside them. Pooled per-user files carry a ``fold`` column, so paired tests match (fold, user_idx).

With ``refit=true`` each fold is a refit run (:func:`towerrec.commands.train.refit`): the epoch count is
chosen on the fold's validation window (``fold<f>/select``), then the model is retrained on the fold's
training + validation interactions and tested on its window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from towerrec.data.build import ensure_prepared, read_manifest
from towerrec.data.schema import DataError
from towerrec.data.settings import SplitSettings, split_settings
from towerrec.evaluation.evaluator import format_table, frame_metrics
from towerrec.evaluation.per_user import per_user_name, read_per_user, write_per_user
from towerrec.evaluation.results import TRAINED, ModelResult, Results, read_results, role_of, single
from towerrec.fileio import text_sha256

log = logging.getLogger(__name__)

Slices = dict[str, dict[str, float]]


def is_rolling(data_cfg: DictConfig) -> bool:
    """True for a rolling data config that names no single fold: the whole backtest is to run."""
    split = data_cfg.get("split") or {}
    return split.get("method") == "rolling" and split.get("fold") is None


def fold_data_configs(data_cfg: DictConfig) -> list[DictConfig]:
    """One resolved data config per fold, oldest first: ``split.fold`` set, its own processed folder."""
    cfg = OmegaConf.to_container(data_cfg, resolve=True)
    split: SplitSettings = split_settings(cfg)  # a one-line DataError on a bad option
    base = Path(cfg["processed_dir"])
    root = base.with_name(f"{base.name}-rolling{split.folds}x{split.window}d")
    folds = []
    for f in range(split.folds):
        fold = OmegaConf.create(cfg)
        fold.split.fold = f
        fold.processed_dir = str(root / f"fold{f}")
        folds.append(fold)
    return folds


def fold_config(cfg: DictConfig, data: DictConfig, out_dir: Path, out_key: str = "paths.output_dir") -> DictConfig:
    """A copy of a train/eval config on one fold's data, writing into ``out_dir``."""
    fold_cfg = cfg.copy()
    with open_dict(fold_cfg):
        fold_cfg.data = data
        if "processed_dir" in fold_cfg.get("datamodule", {}):  # resolved already where towerrec-reproduce built it
            fold_cfg.datamodule.processed_dir = data.processed_dir
        OmegaConf.update(fold_cfg, "paths.output_dir", str(out_dir), force_add=True)
        if out_key != "paths.output_dir":
            OmegaConf.update(fold_cfg, out_key, str(out_dir), force_add=True)
    return fold_cfg


def prepare_folds(data_cfg: DictConfig, workers: int = 2) -> list[dict]:
    """Prepare every fold's folder (a no-op where current); return their manifests, oldest first."""
    manifests = []
    for fold in fold_data_configs(data_cfg):
        out = ensure_prepared(fold, workers=workers)
        manifests.append(read_manifest(out))
    return manifests


def pooled_hash(manifests: list[dict]) -> str:
    """The data hash of a backtest: of its folds' config hashes, in order."""
    return text_sha256(",".join(m["config_hash"] for m in manifests))


def pooled_split_info(manifests: list[dict]) -> dict:
    """The backtest's split: method, folds, window, and every fold's cut dates and counts."""
    first = manifests[0]["split"]["rolling"]
    return {
        "method": "rolling",
        "folds": first["folds"],
        "window_days": first["window_days"],
        "val_days": manifests[0]["split"]["val_days"],
        "last_day": first["last_day"],
        "fold_splits": [
            {
                "fold": m["split"]["rolling"]["fold"],
                "val_start": m["split"]["val_start"],
                "test_start": m["split"]["test_start"],
                "test_end": m["split"].get("test_end"),
                "dropped_after_end": m["split"].get("dropped_after_end", 0),
                "train": m["counts"]["train"],
                "val": m["counts"]["val"],
                "test": m["counts"]["test"],
            }
            for m in manifests
        ],
    }


def pooled_manifest(manifests: list[dict]) -> dict:
    """What reports need of a backtest's data, shaped like one manifest: the last fold's sources and
    counts (the whole catalogue up to the end of the data), the pooled hash and split."""
    last = manifests[-1]
    return {**last, "config_hash": pooled_hash(manifests), "split": pooled_split_info(manifests)}


def stack_folds(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-user tables of the folds, oldest first, as one table with a leading ``fold`` column."""
    return pd.concat(
        [frame.assign(fold=f)[["fold", *frame.columns]] for f, frame in enumerate(frames)], ignore_index=True
    )


def _columns(ks: list[int]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "map") if m != "map" or k == 12]


def _fold_table(rows: dict[str, dict[int, Slices]], pooled: dict[str, Slices], ks: list[int]) -> str:
    """Markdown: one row per (scorer, fold) for the ``all`` slice, then the pooled row."""
    results = {}
    for name, by_fold in rows.items():
        for f, slices in by_fold.items():
            results[f"{name} fold {f}"] = {"all": slices.get("all", {})}
        results[f"{name} pooled"] = {"all": pooled[name].get("all", {})}
    return format_table(results, _columns(ks))


# ----------------------------------------------------------------------------- towerrec-train
def train_folds(cfg: DictConfig, train_one: Callable[[DictConfig], Results | None]) -> Results | None:
    """Train, select and test every fold (``<out>/fold<f>/``), then write the pooled ``metrics.json``
    and ``test_per_user.parquet`` (with a ``fold`` column) into ``<out>``.

    Returns:
        The ``backtest`` record written: ``two_tower``'s pooled item slices, ``val`` (mean of the folds'
        best validation values), ``folds`` (each fold's split, val and test slices), ``data`` (pooled
        hash, split); None on a non-zero rank of a multi-process run.
    """
    out = Path(cfg.paths.output_dir)
    ks = sorted(int(k) for k in cfg.model.ks)
    manifests = prepare_folds(cfg.data, workers=cfg.workers)
    folds, frames = [], []
    for f, data in enumerate(fold_data_configs(cfg.data)):
        log.info("rolling backtest: fold %d of %d (test from %s)", f, len(manifests), manifests[f]["split"]["test_start"])
        metrics = train_one(fold_config(cfg, data, out / f"fold{f}"))
        if metrics is None:  # a non-zero rank of a multi-process run
            return None
        fold = {"fold": f, "dir": f"fold{f}", "split": metrics.data["split"], "val": metrics.val,
                "models": {TRAINED: metrics.scores()}}  # fmt: skip
        if "refit" in metrics.run:
            fold["refit"] = metrics.run["refit"]
        folds.append(fold)
        frame, _ = read_per_user(out / f"fold{f}", "test")
        frames.append(frame)
    per_user = stack_folds(frames)
    pooled = frame_metrics(per_user, ks)
    data = {"name": cfg.data.name, "split": pooled_split_info(manifests), "config_hash": pooled_hash(manifests)}
    if cfg.get("refit"):  # the selection runs pooled too: towerrec-compare <out> <out>/select pairs refit and not
        selected = stack_folds([read_per_user(out / f"fold{f}" / "select", "test")[0] for f in range(len(folds))])
        (out / "select").mkdir(parents=True, exist_ok=True)
        write_per_user(selected, out / "select" / per_user_name("test"), "two_tower", "test", data)
    val_values = [next(iter(fold["val"].values()), None) for fold in folds]
    val_values = [v for v in val_values if v is not None]
    val_key = next(iter(folds[0]["val"]), None)
    val = {val_key: sum(val_values) / len(val_values)} if val_key and val_values else {}
    metrics = single("backtest", "test", data, TRAINED, pooled, val=val, run={"seed": cfg.seed}, folds=folds)
    metrics.write(out / "metrics.json")
    write_per_user(per_user, out / per_user_name("test"), TRAINED, "test", data)
    table = _fold_table({cfg.data.name: {f["fold"]: f["models"][TRAINED] for f in folds}}, {cfg.data.name: pooled}, ks)
    print(f"\nrolling backtest, {len(folds)} folds of {data['split']['window_days']} days, seed {cfg.seed}:\n{table}")
    print(f"pooled metrics ({pooled['all']['users']} (fold, user) pairs): {out / 'metrics.json'}")
    return metrics


# ----------------------------------------------------------------------------- towerrec-eval
def evaluate_folds(cfg: DictConfig, evaluate_one: Callable[[DictConfig], dict[str, Slices]]) -> dict[str, Slices]:
    """Evaluate the baselines on every fold (``<out_dir>/fold<f>/``), then pool each scorer over the
    folds: ``<out_dir>/<name>/metrics.json`` and ``test_per_user.parquet`` (one folder per scorer; the
    scorer's files in ``<out_dir>`` itself when there is only one), and ``<out_dir>/metrics.json``:
    a ``backtest`` record with every scorer (pooled) and ``folds`` (each fold's results).

    Returns:
        ``{scorer: pooled item slices}``.
    """
    if cfg.ckpt_path is not None:
        raise DataError(
            "ckpt_path: a checkpoint is trained on one fold of a rolling split; evaluate it with that fold's data "
            "(data.split.fold=<f>) or run towerrec-train with the rolling split"
        )
    out = Path(cfg.out_dir)
    ks = sorted(int(k) for k in cfg.ks)
    manifests = prepare_folds(cfg.data, workers=cfg.workers)
    by_fold: list[dict[str, Slices]] = []
    for f, data in enumerate(fold_data_configs(cfg.data)):
        log.info("rolling backtest: fold %d of %d", f, len(manifests))
        by_fold.append(evaluate_one(fold_config(cfg, data, out / f"fold{f}", out_key="out_dir")))
    names = list(by_fold[0])
    data = {"name": cfg.data.name, "config_hash": pooled_hash(manifests)}
    split = pooled_split_info(manifests)
    folds = [{"fold": f, "dir": f"fold{f}", "models": r} for f, r in enumerate(by_fold)]
    pooled: dict[str, Slices] = {}
    for name in names:
        frames = []
        for f in range(len(by_fold)):
            folder = out / f"fold{f}" / name if len(names) > 1 else out / f"fold{f}"
            frames.append(read_per_user(folder, cfg.split)[0])
        per_user = stack_folds(frames)
        pooled[name] = frame_metrics(per_user, ks)
        target = out / name if len(names) > 1 else out
        target.mkdir(parents=True, exist_ok=True)
        own_folds = folds if len(names) == 1 else []  # the one scorer's record is the backtest's record
        single("backtest", cfg.split, {**data, "split": split}, name, pooled[name], folds=own_folds).write(
            target / "metrics.json"
        )
        write_per_user(per_user, target / per_user_name(cfg.split), name, cfg.split, data)
    if len(names) > 1:
        models = {n: ModelResult(role_of(n), pooled[n]) for n in names}
        Results("backtest", cfg.split, {**data, "split": split}, models, folds=folds).write(out / "metrics.json")
    table = _fold_table({n: {f: r[n] for f, r in enumerate(by_fold)} for n in names}, pooled, ks)
    title = f"{data['name']} (rolling split, {split['folds']} folds of {split['window_days']} days), {cfg.split}"
    (out / "backtest.md").write_text(f"# {title}\n\n{table}\n")
    print(f"{title}, per fold and pooled over (fold, user) pairs:\n{table}\nwritten: {out / 'backtest.md'}")
    return pooled


# ----------------------------------------------------------------------------- towerrec-eval task=audience
def audience_folds(cfg: DictConfig, evaluate_one: Callable[[DictConfig], dict]) -> dict:
    """The audience task on every fold of a rolling split, then pooled over (fold, item) pairs.

    ``ckpt_path`` is the folder of a rolling ``towerrec-train`` run (it holds ``fold<f>/checkpoints/``,
    one model per fold, each trained on that fold's past only), or None for the baselines alone. Each
    fold is an ordinary audience run in ``<out_dir>/fold<f>/``; the pooled results record (``metrics.json``),
    ``audience.md`` and paired tests (over the same (fold, item) pairs) are written into ``out_dir``.
    """
    from towerrec.evaluation.audience_task import write_audience

    out = Path(cfg.out_dir)
    manifests = prepare_folds(cfg.data, workers=cfg.workers)
    run = Path(cfg.ckpt_path) if cfg.ckpt_path is not None else None
    if run is not None and not (run / "fold0").is_dir():
        raise DataError(
            f"ckpt_path {run}: with a rolling split, pass the folder of a rolling towerrec-train run "
            "(it holds fold0/, fold1/, ...), or evaluate one fold with data.split.fold=<f>"
        )
    fold_meta = []
    for f, data in enumerate(fold_data_configs(cfg.data)):
        fold_cfg = fold_config(cfg, data, out / f"fold{f}", out_key="out_dir")
        if run is not None:
            ckpt = fold_checkpoint(run / f"fold{f}")
            with open_dict(fold_cfg):
                fold_cfg.ckpt_path = str(ckpt)
        log.info("audience backtest: fold %d of %d", f, len(manifests))
        evaluate_one(fold_cfg)
        record = read_results(out / f"fold{f}" / "metrics.json")
        fold_meta.append({**record.header, "models": {n: m.metrics for n, m in record.models.items()}})
    names = list(fold_meta[0]["models"])
    frames = {
        name: pd.concat(
            [
                pd.read_parquet(out / f"fold{f}" / name / "audience_per_item.parquet").assign(fold=f)
                for f in range(len(fold_meta))
            ],
            ignore_index=True,
        )
        for name in names
    }
    meta = {
        "split": cfg.split,
        "data": {"name": cfg.data.name, "config_hash": pooled_hash(manifests), "split": pooled_split_info(manifests)},
        "customers": [m["customers"] for m in fold_meta],
        "items": int(sum(m["items"] for m in fold_meta)),
        "cold_items": int(sum(m["cold_items"] for m in fold_meta)),
        "buyers": int(sum(m["buyers"] for m in fold_meta)),
        "min_buyers": fold_meta[0]["min_buyers"],
        "exclude_buyers": fold_meta[0]["exclude_buyers"],
        "cutoffs": [m["cutoffs"] for m in fold_meta],
        "folds": [{k: m[k] for k in ("customers", "items", "cold_items", "models", "blend") if k in m} for m in fold_meta],
    }
    split = meta["data"]["split"]
    t = cfg.task
    title = (
        f"{cfg.data.name} (rolling split, {split['folds']} folds of {split['window_days']} days), {cfg.split} windows: "
        f"{meta['items']} (fold, item) pairs ({meta['cold_items']} cold) bought by {t.min_buyers}+ customers, "
        f"{min(meta['customers'])} to {max(meta['customers'])} customers ranked per item"
    )
    return write_audience(out, frames, meta, t, title)


def fold_checkpoint(fold_dir: Path) -> Path:
    """The checkpoint a rolling training run tested in one fold (its results record's
    ``run.best_checkpoint``: the best validation epoch, or ``final.ckpt`` of a refit run); a one-line
    error when the fold did not finish."""
    metrics = fold_dir / "metrics.json"
    if not metrics.is_file():
        raise DataError(f"{metrics}: missing: was this fold of the training run finished?")
    best = read_results(metrics).run.get("best_checkpoint")
    if not best:
        raise DataError(f"{metrics}: no run.best_checkpoint: is it a training run's record?")
    path = Path(best)
    if not path.is_file():  # the run folder was moved: the checkpoint sits in its checkpoints/
        path = fold_dir / "checkpoints" / path.name
    if not path.is_file():
        raise DataError(f"{metrics}: its best_checkpoint {best} is missing")
    return path
