"""``towerrec-train``: instantiate -> fit -> test with the best checkpoint -> ``metrics.json``.

The run folder also gets ``test_per_user.parquet``: each test user's metrics in the item slices.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from towerrec import CONFIG_DIR
from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.prepare import ensure_prepared
from towerrec.evaluation.evaluator import format_table
from towerrec.models.two_tower import TwoTowerModule

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> tuple[SequenceDataModule, TwoTowerModule]:
    """Seed, prepare the data if needed, and instantiate the DataModule and the model for it."""
    L.seed_everything(cfg.seed, workers=True)
    ensure_prepared(cfg.data, workers=cfg.workers)  # a no-op when the manifest is current
    dm = instantiate(cfg.datamodule)
    dm.setup()
    with open_dict(cfg):
        cfg.model.meta = dm.meta
    model = instantiate(cfg.model)
    model.attach_features(dm.item_features)
    return dm, model


def train(cfg: DictConfig) -> dict:
    """Train, test the checkpoint with the best validation NDCG, write ``metrics.json``."""
    dm, model = build(cfg)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loggers = [instantiate(lg) for lg in cfg.logger.values()]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    if not loggers:  # logger=none: the LR monitor has nowhere to write (Lightning refuses it)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt = trainer.checkpoint_callback
    if cfg.ckpt_path and ckpt is not None and Path(cfg.ckpt_path).resolve().parent != Path(ckpt.dirpath).resolve():
        # Lightning then restores the best checkpoint's path but not its score: selection restarts.
        log.warning("resuming %s in another run folder: to continue that run exactly, resume in its folder "
                    "(hydra.run.dir=%s)", cfg.ckpt_path, Path(cfg.ckpt_path).resolve().parent.parent)
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.ckpt_path)

    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    if trainer.world_size > 1:  # test the whole split in one process
        if trainer.global_rank != 0:
            return {}
        trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, logger=False, enable_progress_bar=False)
    trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)

    val_best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
    metrics = {
        "test": model.test_results,
        "val": {"best_" + ckpt.monitor.replace("val/", ""): val_best} if ckpt is not None else {},
        "best_checkpoint": best,
        "seed": cfg.seed,
        "data": {"name": cfg.data.name, "split": dm.manifest["split"], "config_hash": dm.manifest["config_hash"]},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if model.test_per_user is not None:  # for intervals pooled over seeds (towerrec-reproduce)
        model.test_per_user.to_parquet(out / "test_per_user.parquet", index=False)
    cols = [f"{m}@{k}" for k in cfg.model.ks for m in ("recall", "ndcg")]
    slices = {s: model.test_results[s] for s in cfg.print_slices if s in model.test_results}
    print(f"\nbest val {ckpt.monitor if ckpt else ''}: {val_best}  checkpoint: {best}")
    print(f"test ({dm.manifest['split']['method']} split, seed {cfg.seed}):\n" + format_table({cfg.data.name: slices}, cols))
    print(f"metrics: {out / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return next(iter(metrics.get("val", {}).values()), None)  # the value optuna maximises


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
