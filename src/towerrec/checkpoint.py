"""Rebuild a trained model and its data from a checkpoint written by ``towerrec-train``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from towerrec.data.datamodule import SequenceDataModule
from towerrec.models.two_tower import TwoTowerModule


def checkpoint_config(ckpt_path: str | Path) -> DictConfig:
    """The resolved run config stored in the checkpoint."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not ckpt.get("towerrec_config"):
        raise ValueError(f"{ckpt_path}: no towerrec_config in this checkpoint (not written by towerrec-train?)")
    return OmegaConf.create(ckpt["towerrec_config"])


def load_trained(
    ckpt_path: str | Path, processed_dir: str | None = None, device: str | torch.device = "cpu"
) -> tuple[TwoTowerModule, SequenceDataModule, DictConfig]:
    """Load model weights, the DataModule they were trained on, and the run config.

    Args:
        ckpt_path: a ``.ckpt`` from ``towerrec-train``.
        processed_dir: the processed data folder, when it moved since training.
        device: where the model goes.

    Returns:
        The model in eval mode with item features attached, the set-up DataModule, the config.
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not ckpt.get("towerrec_config"):
        raise ValueError(f"{ckpt_path}: no towerrec_config in this checkpoint (not written by towerrec-train?)")
    cfg = OmegaConf.create(ckpt["towerrec_config"])
    if processed_dir is not None:
        cfg.datamodule.processed_dir = processed_dir
    dm: SequenceDataModule = instantiate(cfg.datamodule)
    dm.setup()
    if dm.meta["num_items"] != cfg.model.meta.num_items:
        raise ValueError(
            f"{ckpt_path}: trained on {cfg.model.meta.num_items} items, "
            f"but {cfg.datamodule.processed_dir} has {dm.meta['num_items']}"
        )
    model: TwoTowerModule = instantiate(cfg.model)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device)
    model.attach_features(dm.item_features)
    model.eval()
    return model, dm, cfg


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
