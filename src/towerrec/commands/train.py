"""``towerrec-train``: instantiate -> fit -> test the best checkpoint -> ``metrics.json``.

``metrics.json`` is a :class:`~towerrec.evaluation.results.Results` record of kind ``train``: the
test slices of ``two_tower``, the best validation value (``val``) and the run (``best_checkpoint``,
``best_epoch``, ``seed``, and ``refit`` for a refit run).

The run folder also gets ``test_per_user.parquet``: each test user's metrics in the item slices.
With ``refit=true`` the run first selects the number of epochs on validation (in ``<out>/select``),
then trains again on training + validation for that many epochs and tests those final weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from towerrec.backtest import is_rolling, train_folds
from towerrec.commands.common import hydra_cli
from towerrec.data.build import ensure_prepared
from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.schema import DataError
from towerrec.evaluation.evaluator import format_table, score_split
from towerrec.evaluation.per_user import per_user_name, write_per_user
from towerrec.evaluation.results import TRAINED, Results, single
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
    topk = model.rank_split(s, max(ks), chunk_size=dm.eval_batch_size)  # users read in chunks
    return score_split(topk, s, dm.item_features, ks)


def train(cfg: DictConfig) -> Results | None:
    """Train, test the checkpoint with the best validation metric, write ``metrics.json``.

    Returns:
        The record written (None on a non-zero rank of a multi-process run).

    With ``data.split.method=rolling`` every fold is trained and tested in ``<out>/fold<f>`` and the
    pooled result written in ``<out>`` (:func:`towerrec.backtest.train_folds`). With ``refit=true``,
    see :func:`refit`.
    """
    if is_rolling(cfg.data):
        return train_folds(cfg, train)
    if cfg.get("refit"):
        return refit(cfg)
    return fit_and_test(cfg)


#: Callbacks that read the validation metric: a refit has no validation to read.
_SELECTION_CALLBACKS = ("lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.EarlyStopping")


def refit(cfg: DictConfig) -> Results | None:
    """Select the number of epochs on validation, then retrain on training + validation and test.

    1. ``<out>/select``: an ordinary run (early stopping and checkpoint selection on validation);
       its best checkpoint's epoch ``e`` gives the schedule, ``e + 1`` epochs.
    2. ``<out>``: the same config and seed with ``datamodule.fit_splits=[train, val]``,
       ``trainer.max_epochs=e + 1``, no validation loop and no selection callbacks; its final weights
       (``checkpoints/final.ckpt``) are tested on the test split.

    The model then trains up to the test window, as the baselines' histories and counts already do.
    ``metrics.json`` has the refit run's test slices, the selection run's ``val``, and ``run["refit"]``:
    the epochs, and the selection run's folder and test figures (the same split: paired comparisons of
    the two are ``towerrec-compare <out>/select <out>``).
    """
    if not any((c or {}).get("_target_") == _SELECTION_CALLBACKS[0] for c in cfg.callbacks.values()):
        raise DataError("refit=true: the selection run needs a ModelCheckpoint on validation (callbacks=default) to choose the epoch count")
    out = Path(cfg.paths.output_dir)
    select_cfg = cfg.copy()
    with open_dict(select_cfg):
        select_cfg.refit = False
        select_cfg.paths.output_dir = str(out / "select")
    selected = fit_and_test(select_cfg)
    if selected is None:  # a non-zero rank of a multi-process run
        return None
    epochs = int(selected.run["best_epoch"]) + 1
    refit_cfg = cfg.copy()
    with open_dict(refit_cfg):
        refit_cfg.refit = False
        refit_cfg.ckpt_path = None
        refit_cfg.paths.output_dir = str(out)
        refit_cfg.datamodule.fit_splits = ["train", "val"]
        refit_cfg.trainer.max_epochs = epochs
        refit_cfg.trainer.limit_val_batches = 0
        refit_cfg.trainer.enable_checkpointing = False  # else Lightning adds a default ModelCheckpoint
        refit_cfg.callbacks = {k: c for k, c in cfg.callbacks.items() if c.get("_target_") not in _SELECTION_CALLBACKS}
    log.info("refit: training on train + val for %d epochs (selected on validation in %s)", epochs, out / "select")
    metrics = fit_and_test(refit_cfg)
    if metrics is None:
        return None
    metrics.val = selected.val
    chosen = {"dir": "select", "best_checkpoint": selected.run["best_checkpoint"], "test": selected.scores()}
    metrics.run["refit"] = {"epochs": epochs, "selected": chosen}
    metrics.write(out / "metrics.json")
    print(f"refit on train + val for {epochs} epochs, the best validation epoch count of {out / 'select'}")
    return metrics


def fit_and_test(cfg: DictConfig) -> Results | None:
    """One run: fit (selecting the checkpoint on validation), test it, write ``metrics.json``."""
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
        return None

    ks = sorted(int(k) for k in cfg.model.ks)
    test, per_user = test_checkpoint(best, dm, "test", ks, trainer.strategy.root_device)
    val_best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
    data = {"name": cfg.data.name, "split": dm.manifest["split"], "config_hash": dm.manifest["config_hash"]}
    run = {
        "best_checkpoint": best,
        # 0-based: the selected model trained best_epoch + 1 epochs (None without a checkpoint callback)
        "best_epoch": int(read_checkpoint(best)["epoch"]) if ckpt is not None else None,
        "seed": cfg.seed,
    }
    val = {"best_" + ckpt.monitor.replace("val/", ""): val_best} if ckpt is not None else {}
    metrics = single("train", "test", data, TRAINED, test, val=val, run=run)
    metrics.write(out / "metrics.json")
    # Each user's values: intervals pooled over seeds (towerrec-reproduce), paired tests (towerrec-compare).
    write_per_user(per_user, out / per_user_name("test"), TRAINED, "test", data)
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    slices = {s: test[s] for s in cfg.print_slices if s in test}
    print(f"\nbest val {ckpt.monitor}: {val_best}  checkpoint: {best}" if ckpt else f"\nfinal weights: {best}")
    print(f"test ({dm.manifest['split']['method']} split, seed {cfg.seed}):\n" + format_table({cfg.data.name: slices}, cols))
    print(f"metrics: {out / 'metrics.json'}")
    return metrics


def objective(cfg: DictConfig) -> float | None:
    """Train; return the best validation metric, the value the optuna sweeper maximises."""
    results = train(cfg)
    return next(iter(results.val.values()), None) if results is not None else None


main = hydra_cli("train", objective, (DataError, CheckpointError))  # the user's own mistakes: one line


if __name__ == "__main__":
    main()
