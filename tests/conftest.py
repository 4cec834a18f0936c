"""Shared fixtures: the real configs, composed with tiny sizes, CPU, no logger, tmp outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from towerrec import CONFIG_DIR, PROJECT_ROOT

HM_ROOT = Path(os.environ.get("TOWERREC_HM_ROOT", PROJECT_ROOT / ".." / "shared" / "data" / "hm")).resolve()
HAS_HM = (HM_ROOT / "transactions.csv").is_file()
needs_hm = pytest.mark.skipif(not HAS_HM, reason=f"H&M sample not found at {HM_ROOT} (set TOWERREC_HM_ROOT)")

#: A synthetic shop small enough to train a batch in a second.
TINY_DATA = [
    "data.source.n_users=150",
    "data.source.n_items=120",
    "data.source.n_interactions=3000",
    "data.image_size=16",
]
#: A model and trainer small enough for CI.
TINY_TRAIN = [
    "model.dim=16",
    "model.item_tower.image_encoder.channels=4",
    "model.loss.num_uniform_negatives=16",
    "datamodule.max_len=10",
    "datamodule.batch_size=32",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "logger=none",
]


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a real config; ``paths.output_dir`` points at a temporary folder."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="session")
def tiny_processed_dir(tmp_path_factory) -> Path:
    """One processed tiny synthetic folder shared by the session (prepare is a no-op after)."""
    return tmp_path_factory.mktemp("data") / "synthetic_tiny"


@pytest.fixture
def tiny_train_cfg(tiny_processed_dir, tmp_path):
    """A factory: the train config on tiny synthetic data plus extra overrides."""

    def make(*overrides: str) -> DictConfig:
        return compose_cfg(
            "train", [*TINY_DATA, f"data.processed_dir={tiny_processed_dir}", *TINY_TRAIN, *overrides], tmp_path / "run"
        )

    return make
