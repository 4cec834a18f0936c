"""``towerrec-train``: instantiate -> fit -> test the best checkpoint -> ``metrics.json``.

The run folder also gets ``test_per_user.parquet``: each test user's metrics in the item slices.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from towerrec.backtest import is_rolling, train_folds
from towerrec.cli import hydra_cli
from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.prepare import ensure_prepared
from towerrec.data.schema import DataError
from towerrec.evaluation.evaluator import format_table, score_split
from towerrec.evaluation.per_user import per_user_name, write_per_user
from towerrec.fileio import write_json
from towerrec.models.checkpoint import CheckpointError, load_trained, read_checkpoint
from towerrec.models.two_tower import TwoTowerModule

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> tuple[SequenceDataModule, TwoTowerModule, DictConfig]:
    """Seed, prepare the data if needed, and instantiate the DataModule and the model for it.

    Returns:
        The DataModule, the model and the run config: a copy of ``cfg`` with the data's sizes
        (``model.meta``) filled in.
    """
    L.seed_everything(cfg.seed, workers=True)
    ensure_prepared(cfg.data, workers=cfg.workers)  # a no-op when the manifest is current
    dm = instantiate(cfg.datamodule)
    dm.setup()
    run_cfg = cfg.copy()
    OmegaConf.set_struct(run_cfg, False)
    run_cfg.model.meta = dm.meta
    return dm, TwoTowerModule.from_config(run_cfg.model), run_cfg


def test_checkpoint(
    ckpt_path: str, dm: SequenceDataModule, split: str, ks: list[int], device: str | torch.device = "cpu"
) -> tuple[dict, pd.DataFrame]:
    """Reload ``ckpt_path`` through the one checkpoint loader and score ``split`` of ``dm`` by full ranking."""
    model, dm = load_trained(ckpt_path, device=device, dm=dm)
    s = dm.eval_split(split)
    topk = model.rank(s.history, max(ks), seen=s.seen, chunk_size=dm.eval_batch_size)
    return score_split(topk.cpu(), s, dm.item_features, ks)


def train(cfg: DictConfig) -> dict:
    """Train, test the checkpoint with the best validation metric, write ``metrics.json``.

    With ``data.split.method=rolling`` every fold is trained and tested in ``<out>/fold<f>`` and the
    pooled result written in ``<out>`` (:func:`towerrec.backtest.train_folds`).
    """
    if is_rolling(cfg.data):
        return train_folds(cfg, train)
    if cfg.ckpt_path is not None:
        read_checkpoint(cfg.ckpt_path)  # refuses a file holding pickled objects in one line, before Lightning reads it
    dm, model, run_cfg = build(cfg)

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(run_cfg, resolve=True))
    loggers = [instantiate(lg) for lg in cfg.logger.values()]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    if not loggers:  # logger=none: the LR monitor has nowhere to write (Lightning refuses it)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(run_cfg, resolve=True))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt = trainer.checkpoint_callback
    if cfg.ckpt_path and ckpt is not None and Path(cfg.ckpt_path).resolve().parent != Path(ckpt.dirpath).resolve():
        # Lightning then restores the best checkpoint's path but not its score: selection restarts.
        log.warning("resuming %s in another run folder: to continue that run exactly, resume in its folder "
                    "(hydra.run.dir=%s)", cfg.ckpt_path, Path(cfg.ckpt_path).resolve().parent.parent)
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    if best is None:  # no checkpoint callback: save the final weights to test them the same way
        best = str(out / "checkpoints" / "final.ckpt")
        trainer.save_checkpoint(best)  # (every rank takes part)
    if trainer.global_rank != 0:  # rank 0 tests the whole split in one process
        return {}

    ks = sorted(int(k) for k in cfg.model.ks)
    test, per_user = test_checkpoint(best, dm, "test", ks, trainer.strategy.root_device)
    val_best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
    metrics = {
        "test": test,
        "val": {"best_" + ckpt.monitor.replace("val/", ""): val_best} if ckpt is not None else {},
        "best_checkpoint": best,
        "seed": cfg.seed,
        "data": {"name": cfg.data.name, "split": dm.manifest["split"], "config_hash": dm.manifest["config_hash"]},
    }
    write_json(out / "metrics.json", metrics)
    # Each user's values: intervals pooled over seeds (towerrec-reproduce), paired tests (towerrec-compare).
    write_per_user(per_user, out / per_user_name("test"), "two_tower", "test", metrics["data"])
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    slices = {s: test[s] for s in cfg.print_slices if s in test}
    print(f"\nbest val {ckpt.monitor if ckpt else ''}: {val_best}  checkpoint: {best}")
    print(f"test ({dm.manifest['split']['method']} split, seed {cfg.seed}):\n" + format_table({cfg.data.name: slices}, cols))
    print(f"metrics: {out / 'metrics.json'}")
    return metrics


def objective(cfg: DictConfig) -> float | None:
    """Train; return the best validation metric, the value the optuna sweeper maximises."""
    return next(iter(train(cfg).get("val", {}).values()), None)


main = hydra_cli("train", objective, (DataError, CheckpointError))  # the user's own mistakes: one line


if __name__ == "__main__":
    main()
