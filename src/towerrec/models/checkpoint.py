"""The one checkpoint loader: every ``.ckpt`` the project reads goes through :func:`read_checkpoint`.

A checkpoint of :class:`~towerrec.models.two_tower.TwoTowerModule` (from ``towerrec-train`` or any
``Trainer.fit`` of a module built by :meth:`TwoTowerModule.from_config`) carries its resolved model
config in its hyperparameters and the DataModule's arguments beside them, so it rebuilds without
the run that wrote it. Files are read with ``torch.load(weights_only=True)``: a file holding any
other pickled object is refused and never unpickled.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from towerrec.data.datamodule import SequenceDataModule
from towerrec.models.two_tower import TwoTowerModule

#: Where Lightning stores the module's and the DataModule's hyperparameters in a checkpoint.
MODEL_KEY = TwoTowerModule.CHECKPOINT_HYPER_PARAMS_KEY
DATAMODULE_KEY = SequenceDataModule.CHECKPOINT_HYPER_PARAMS_KEY


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a one-line reason naming the file."""


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, loaded with ``weights_only=True`` (tensors and plain values only).

    Raises:
        CheckpointError: for a missing file, a file that is no checkpoint, or one holding other objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # PyTorch's own message suggests weights_only=False, which would run the payload: never say that.
        raise CheckpointError(
            f"{path}: refused, it holds objects other than weights and plain values "
            f"({str(err).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def model_config(ckpt: dict, path: str | Path = "checkpoint") -> DictConfig:
    """The resolved model config a checkpoint's module was built from."""
    config = (ckpt.get(MODEL_KEY) or {}).get("config")
    if not config:
        raise CheckpointError(
            f"{path}: no model config in its hyperparameters (build the module with TwoTowerModule.from_config)"
        )
    return OmegaConf.create(config)


def data_hash(ckpt: dict) -> str | None:
    """The processed data's ``config_hash`` the checkpoint was trained on, when recorded."""
    meta = (ckpt.get(MODEL_KEY) or {}).get("meta") or {}
    return meta.get("config_hash")


def load_model(path: str | Path, device: str | torch.device = "cpu", ckpt: dict | None = None) -> TwoTowerModule:
    """The trained module of a checkpoint, in eval mode, without item features attached.

    Enough for history queries over exported item vectors; :func:`load_trained` adds the data.

    Args:
        path: the ``.ckpt`` file.
        device: where the module goes.
        ckpt: the already-read checkpoint of ``path``, to avoid reading it twice.
    """
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    model = TwoTowerModule.from_config(model_config(ckpt, path))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit its own config ({str(err).splitlines()[0]})") from None
    return model.to(device).eval()


def load_trained(
    path: str | Path,
    processed_dir: str | None = None,
    device: str | torch.device = "cpu",
    force: bool = False,
    dm: SequenceDataModule | None = None,
) -> tuple[TwoTowerModule, SequenceDataModule]:
    """The trained module with its item features, and the set-up DataModule it was trained on.

    Args:
        path: the ``.ckpt`` file.
        processed_dir: the processed data folder, when it moved since training.
        device: where the module goes.
        force: use a checkpoint trained on processed data with another ``config_hash`` all the same
            (refused otherwise).
        dm: a set-up DataModule to use instead of rebuilding the recorded one (``towerrec-train``
            tests on the data it just trained on).

    Raises:
        CheckpointError: with a one-line reason.
    """
    ckpt = read_checkpoint(path)
    if dm is None:
        dm_args = dict(ckpt.get(DATAMODULE_KEY) or {})
        if not dm_args and processed_dir is None:
            raise CheckpointError(f"{path}: no DataModule arguments recorded; pass the processed data folder")
        if processed_dir is not None:
            dm_args["processed_dir"] = str(processed_dir)
        dm = SequenceDataModule(**dm_args)
        dm.setup()
    trained_on, current = data_hash(ckpt), dm.manifest.get("config_hash")
    if trained_on is not None and trained_on != current and not force:
        raise CheckpointError(
            f"{path}: trained on processed data {trained_on[:12]}, but {dm.processed_dir} has {current[:12]} "
            "(pass force=true to use it anyway)"
        )
    model = load_model(path, device, ckpt)
    if dm.meta["num_items"] != model.hparams.meta["num_items"]:
        raise CheckpointError(
            f"{path}: trained on {model.hparams.meta['num_items']} items, but {dm.processed_dir} has {dm.meta['num_items']}"
        )
    model.attach_features(dm.model_features)  # the flags and counts of what it trained on
    return model, dm
