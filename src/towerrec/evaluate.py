"""``towerrec-eval``: full-ranking metrics of a trained checkpoint and/or baselines, in one table.

Every scorer takes the same path: scores over the whole catalogue for chunks of users
(:func:`~towerrec.evaluation.metrics.topk_from_scorer`, seen items masked when the data config says so),
then :func:`~towerrec.evaluation.evaluator.evaluate_split` for the slices. Only full ranking is
implemented: sampled metrics (the target ranked among 100 random negatives) are not, on purpose, since
they overstate quality and can reorder models.

Writes into ``out_dir``:

* ``metrics.json``: one scorer: ``{slice: {metric@k: value}, "model", "split", "data": {name,
  config_hash}}``; several (``baseline=all``, or a checkpoint plus a baseline): ``{"models": {name:
  {slice: ...}}, "split", "data"}`` and each scorer's own file in ``<out_dir>/<name>/``. NaN (a slice
  without users) is written as null.
* ``metrics.md``: the main slices as a markdown table, then every slice.
* ``<split>_per_user.parquet`` beside each scorer's ``metrics.json``: every user's metrics in the item
  slices, for ``towerrec-compare`` (:mod:`towerrec.evaluation.per_user`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from towerrec import CONFIG_DIR
from towerrec.data.datamodule import EvalSplit, SequenceDataModule
from towerrec.data.prepare import ensure_prepared
from towerrec.evaluation.baselines import Baseline, rank
from towerrec.evaluation.evaluator import (
    evaluate_split,
    format_table,
    item_slices_per_user,
    per_user_frame,
    seen_pairs,
)
from towerrec.evaluation.metrics import score_topk
from towerrec.evaluation.per_user import per_user_name, write_per_user

log = logging.getLogger(__name__)

Results = dict[str, dict[str, float]]


def model_topk(model, split: EvalSplit, k: int, chunk_size: int) -> torch.Tensor:
    """Top-k items of a trained two-tower model for the users of ``split``."""
    device = model.item_tower.fusion_device
    with torch.no_grad():
        item_emb = model.item_tower.embed_all()  # (N+1, D)
        user_emb = torch.cat(
            [
                model.user_embeddings(split.history[i : i + chunk_size].to(device), item_emb)
                for i in range(0, len(split), chunk_size)
            ]
        )  # (U, D)
        return score_topk(user_emb, item_emb, k, seen=seen_pairs(split.seen), chunk_size=chunk_size).cpu()


def build_baselines(cfg: DictConfig | None) -> dict[str, Baseline]:
    """One baseline (a config with ``_target_``) or several (a mapping of name -> config)."""
    if cfg is None:
        return {}
    if "_target_" in cfg:
        baseline = instantiate(cfg)
        return {baseline.name: baseline}
    return {name: instantiate(sub) for name, sub in cfg.items()}


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def evaluate(cfg: DictConfig) -> dict[str, Results]:
    """Evaluate the checkpoint and/or baselines of ``cfg`` on ``cfg.split``; write and print the tables.

    Returns:
        ``{scorer name: {slice: {metric@k: value}}}``.
    """
    baseline_cfg = cfg.get("baseline")
    if cfg.ckpt_path is None and baseline_cfg is None:
        raise ValueError(
            "nothing to evaluate: pass ckpt_path=<checkpoint> and/or baseline=<name> (or baseline=all)"
        )
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {cfg.split!r}")
    ks = sorted(int(k) for k in cfg.ks)

    results: dict[str, Results] = {}
    per_slice: dict[str, dict] = {}  # scorer -> its item slices' per-user values
    if cfg.ckpt_path is not None:
        # Imported here so that baseline runs do not load the model code.
        from towerrec.checkpoint import checkpoint_config, load_trained

        ensure_prepared(checkpoint_config(cfg.ckpt_path).data, workers=cfg.workers)
        model, dm, _ = load_trained(cfg.ckpt_path, device=cfg.device)
        split = getattr(dm, f"{cfg.split}_split")
        topk = model_topk(model, split, max(ks), cfg.chunk_size)
        per_slice["two_tower"] = item_slices_per_user(topk, split, dm.item_features.is_cold, ks)
        results["two_tower"] = evaluate_split(
            topk, split, dm.item_features.is_cold, dm.item_features.train_users, ks, cfg.segments, per_slice["two_tower"]
        )
    else:
        ensure_prepared(cfg.data, workers=cfg.workers)
        dm: SequenceDataModule = instantiate(cfg.datamodule)
        dm.setup()
        split = getattr(dm, f"{cfg.split}_split")

    f = dm.item_features
    for name, baseline in build_baselines(baseline_cfg).items():
        log.info("fitting and ranking %s", name)
        topk = rank(baseline.fit(dm), split, max(ks), cfg.chunk_size)
        per_slice[name] = item_slices_per_user(topk, split, f.is_cold, ks)
        results[name] = evaluate_split(topk, split, f.is_cold, f.train_users, ks, cfg.segments, per_slice[name])

    meta = {
        "split": cfg.split,
        "data": {"name": dm.manifest["name"], "config_hash": dm.manifest["config_hash"]},
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        target = out if len(results) == 1 else out / name
        target.mkdir(parents=True, exist_ok=True)
        (target / "metrics.json").write_text(json.dumps(_json_safe({**res, "model": name, **meta}), indent=2))
        frame = per_user_frame(per_slice[name], split.user_idx.cpu().numpy())
        write_per_user(frame, target / per_user_name(cfg.split), name, cfg.split, meta["data"])
    if len(results) > 1:
        (out / "metrics.json").write_text(json.dumps(_json_safe({"models": results, **meta}), indent=2))

    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + [f"coverage@{max(ks)}"]
    main = {m: {s: r[s] for s in cfg.print_slices if s in r} for m, r in results.items()}
    table = format_table(main, cols)
    title = f"{meta['data']['name']} ({dm.manifest['split']['method']} split), {cfg.split}, full ranking"
    (out / "metrics.md").write_text(
        f"# {title}\n\n{table}\n\n## All slices\n\n{format_table(results, cols)}\n"
    )
    print(f"{title}:\n{table}\nmetrics: {out / 'metrics.json'}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
