"""``refit=true``: the epoch count chosen on validation, then a retrain on training + validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DATA, TINY_TRAIN, compose_cfg

from towerrec.commands.compare import compare
from towerrec.commands.train import train
from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.schema import DataError
from towerrec.evaluation.results import Results, read_results
from towerrec.models.checkpoint import load_trained


@pytest.fixture(scope="module")
def refit_run(tmp_path_factory) -> tuple[Results, Path]:
    root = tmp_path_factory.mktemp("refit")
    overrides = [*TINY_DATA, f"data.processed_dir={root / 'data'}", *TINY_TRAIN, "trainer.max_epochs=3",
                 "~trainer.limit_train_batches", "refit=true"]
    cfg = compose_cfg("train", overrides, root / "run")
    return train(cfg), root


def test_refit_trains_the_selected_epochs_on_train_and_val(refit_run):
    metrics, root = refit_run
    run = root / "run"
    selected = read_results(run / "select" / "metrics.json")
    epochs = selected.run["best_epoch"] + 1
    assert metrics.run["refit"]["epochs"] == epochs
    assert metrics.val == selected.val  # the selection's validation value, not a refit one
    assert metrics.run["refit"]["selected"]["test"]["all"]["recall@20"] == selected.scores()["all"]["recall@20"]
    ckpt = torch.load(metrics.run["best_checkpoint"], map_location="cpu", weights_only=True)
    assert Path(metrics.run["best_checkpoint"]).name == "final.ckpt"
    assert ckpt["epoch"] == epochs  # trained exactly the selected number of epochs
    assert list(ckpt["datamodule_hyper_parameters"]["fit_splits"]) == ["train", "val"]
    assert not any(k.startswith(("ModelCheckpoint", "EarlyStopping")) for k in ckpt["callbacks"])
    # The refit model is tested on the same users and slices as the selection run: paired.
    assert metrics.scores()["all"]["users"] == selected.scores()["all"]["users"]
    assert metrics.scores()["cold_items"]["users"] == selected.scores()["cold_items"]["users"]


def test_refit_checkpoint_reloads_with_the_flags_it_trained_on(refit_run):
    metrics, root = refit_run
    model, dm = load_trained(metrics.run["best_checkpoint"])
    inter = dm.interactions
    fit_items = np.unique(inter.loc[inter["split"].isin(["train", "val"]), "item_idx"].to_numpy())
    warm = np.flatnonzero(~model.item_tower.is_cold.numpy())
    assert np.array_equal(warm, fit_items)  # warm for the model = bought in train or val
    # ... while the evaluation slices keep the data's definition (no training interaction).
    assert torch.equal(dm.item_features.is_cold, torch.from_numpy(np.r_[True, dm.items["is_cold"].to_numpy()]))
    val_only = set(fit_items) - set(inter.loc[inter["split"] == "train", "item_idx"])
    assert val_only and all(dm.item_features.is_cold[i] for i in val_only)


def test_fit_splits_read_train_and_val_only(refit_run):
    _, root = refit_run
    dm = SequenceDataModule(str(root / "data"), max_len=10, fit_splits=["train", "val"])
    dm.setup()
    inter = dm.interactions
    fit = inter[inter["split"].isin(["train", "val"])]
    # Every fit interaction but each user's first is one next-item target; no test interaction is.
    targets = dm.train_data.tensors["targets"]
    assert int((targets > 0).sum()) == len(fit) - fit["user_idx"].nunique()
    plain = SequenceDataModule(str(root / "data"), max_len=10)
    plain.setup()
    tr = inter[inter["split"] == "train"]
    assert int((plain.train_data.tensors["targets"] > 0).sum()) == len(tr) - tr["user_idx"].nunique()
    assert plain.model_features is plain.item_features
    with pytest.raises(DataError, match=r"^datamodule\.fit_splits: .*\['train', 'test'\]"):
        SequenceDataModule(str(root / "data"), fit_splits=["train", "test"])


def test_refit_without_a_checkpoint_callback_is_refused_before_training(tmp_path):
    tiny = [o for o in TINY_TRAIN if "callbacks" not in o]
    cfg = compose_cfg("train", [*TINY_DATA, f"data.processed_dir={tmp_path / 'data'}", *tiny, "callbacks=none",
                                "refit=true"], tmp_path / "run")
    with pytest.raises(DataError, match=r"^refit=true: .*ModelCheckpoint"):
        train(cfg)
    assert not (tmp_path / "run" / "select").exists()


def test_rolling_refit_runs_in_every_fold(tmp_path):
    rolling = ["data.split.method=rolling", "+data.split.folds=2", "+data.split.window_days=5", "data.split.val_days=4"]
    cfg = compose_cfg("train", [*TINY_DATA, f"data.processed_dir={tmp_path / 'data'}", *rolling, *TINY_TRAIN,
                                "refit=true"], tmp_path / "run")
    metrics = train(cfg)
    for fold in metrics.folds:
        assert fold["refit"]["epochs"] >= 1
        assert (tmp_path / "run" / fold["dir"] / "select" / "metrics.json").exists()
        ckpt = torch.load(tmp_path / "run" / fold["dir"] / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
        assert list(ckpt["datamodule_hyper_parameters"]["fit_splits"]) == ["train", "val"]
    # The selection runs are pooled too, on the same (fold, user) pairs: refit against no refit.
    table, _, _ = compare(tmp_path / "run", tmp_path / "run" / "select", metrics=["recall@20"])
    assert table.loc[table["slice"] == "all", "users"].item() == metrics.scores()["all"]["users"]
