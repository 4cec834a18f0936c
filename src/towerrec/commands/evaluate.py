"""``towerrec-eval``: full-ranking metrics of a trained checkpoint and/or baselines, in one table.

Every scorer takes the same path: scores over the whole catalogue for chunks of users
(:func:`~towerrec.ranking.topk_from_scorer`, seen items masked when the data config says so),
then :func:`~towerrec.evaluation.evaluator.evaluate_split` for the slices. Only full ranking is
implemented: sampled metrics (the target ranked among 100 random negatives) are not, on purpose, since
they overstate quality and can reorder models.

Writes into ``out_dir``:

* ``metrics.json``: a :class:`~towerrec.evaluation.results.Results` record of kind ``eval`` with
  every scorer's ``{slice: {metric@k: value}}``; with several scorers (``baseline=all``, or a
  checkpoint plus a baseline) each also gets its own one-scorer record in ``<out_dir>/<name>/``. NaN
  (a slice without users) is written as null.
* ``metrics.md``: the main slices as a markdown table, then every slice.
* ``<split>_per_user.parquet`` beside each scorer's ``metrics.json``: every user's metrics in the item
  slices, for ``towerrec-compare`` (:mod:`towerrec.evaluation.per_user`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig

from towerrec.backtest import audience_folds, evaluate_folds, is_rolling
from towerrec.commands.common import hydra_cli
from towerrec.data.build import ensure_prepared
from towerrec.data.datamodule import SequenceDataModule
from towerrec.evaluation.baselines import Baseline, rank
from towerrec.evaluation.evaluator import format_table, score_split
from towerrec.evaluation.per_user import per_user_name, write_per_user
from towerrec.evaluation.results import ModelResult, Results, role_of, single

log = logging.getLogger(__name__)

Slices = dict[str, dict[str, float]]


def build_baselines(cfg: DictConfig | None) -> dict[str, Baseline]:
    """One baseline (a config with ``_target_``) or several (a mapping of name -> config)."""
    if cfg is None:
        return {}
    if "_target_" in cfg:
        baseline = instantiate(cfg)
        return {baseline.name: baseline}
    return {name: instantiate(sub) for name, sub in cfg.items()}


def evaluate(cfg: DictConfig) -> dict[str, Slices]:
    """Evaluate the checkpoint and/or baselines of ``cfg`` on ``cfg.split``; write and print the tables.

    Returns:
        ``{scorer name: {slice: {metric@k: value}}}``.
    """
    if cfg.get("task") is not None and cfg.task.name == "audience":  # item -> customers
        from towerrec.evaluation.audience_task import evaluate_audience

        return audience_folds(cfg, evaluate_audience) if is_rolling(cfg.data) else evaluate_audience(cfg)
    if is_rolling(cfg.data):  # every fold, then pooled over (fold, user) pairs
        return evaluate_folds(cfg, evaluate)
    baseline_cfg = cfg.get("baseline")
    if cfg.ckpt_path is None and baseline_cfg is None:
        raise ValueError(
            "nothing to evaluate: pass ckpt_path=<checkpoint> and/or baseline=<name> (or baseline=all)"
        )
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {cfg.split!r}")
    ks = sorted(int(k) for k in cfg.ks)

    results: dict[str, Slices] = {}
    per_user: dict[str, pd.DataFrame] = {}  # scorer -> each user's values in the item slices
    if cfg.ckpt_path is not None:
        # Imported here so that baseline runs do not load the model code.
        from towerrec.models.checkpoint import load_trained

        model, dm = load_trained(cfg.ckpt_path, device=cfg.device, force=cfg.get("force", False))
        split = dm.eval_split(cfg.split)
        topk = model.rank_split(split, max(ks), chunk_size=cfg.chunk_size)  # users read in chunks
        results["two_tower"], per_user["two_tower"] = score_split(topk, split, dm.item_features, ks, cfg.segments)
    else:
        ensure_prepared(cfg.data, workers=cfg.workers)
        dm: SequenceDataModule = instantiate(cfg.datamodule)
        dm.setup()
        split = dm.eval_split(cfg.split)

    for name, baseline in build_baselines(baseline_cfg).items():
        log.info("fitting and ranking %s", name)
        topk = rank(baseline.fit(dm), split, max(ks), cfg.chunk_size)
        results[name], per_user[name] = score_split(topk, split, dm.item_features, ks, cfg.segments)

    meta = {
        "split": cfg.split,
        "data": {"name": dm.manifest["name"], "config_hash": dm.manifest["config_hash"]},
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        target = out if len(results) == 1 else out / name
        target.mkdir(parents=True, exist_ok=True)
        single("eval", cfg.split, meta["data"], name, res).write(target / "metrics.json")
        write_per_user(per_user[name], target / per_user_name(cfg.split), name, cfg.split, meta["data"])
    if len(results) > 1:
        models = {name: ModelResult(role_of(name), res) for name, res in results.items()}
        Results("eval", cfg.split, meta["data"], models).write(out / "metrics.json")

    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + [f"coverage@{max(ks)}"]
    main = {m: {s: r[s] for s in cfg.print_slices if s in r} for m, r in results.items()}
    table = format_table(main, cols)
    title = f"{meta['data']['name']} ({dm.manifest['split']['method']} split), {cfg.split}, full ranking"
    (out / "metrics.md").write_text(
        f"# {title}\n\n{table}\n\n## All slices\n\n{format_table(results, cols)}\n"
    )
    print(f"{title}:\n{table}\nmetrics: {out / 'metrics.json'}")
    return results


# The user's own mistakes (DataError, CheckpointError, a bad option) are ValueErrors: one line each.
main = hydra_cli("eval", evaluate, (ValueError,))


if __name__ == "__main__":
    main()
