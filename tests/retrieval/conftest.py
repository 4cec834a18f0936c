"""A tiny synthetic checkpoint, trained once per session, and one export of it per index config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from towerrec import CONFIG_DIR

INDEX_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "index").glob("*.yaml"))


def index_spec(name: str, **overrides):
    """The IndexSpec of ``configs/index/<name>.yaml``, composed as ``towerrec-export`` does."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"index={name}", "ckpt_path=unused"])
    return instantiate(OmegaConf.merge(cfg.index, overrides))


def train_tiny(root: Path, *extra: str) -> Path:
    """A one-epoch, two-batch checkpoint on a 150-item synthetic shop (dim 16)."""
    from towerrec.train import train

    overrides = [
        f"data.processed_dir={root / 'processed'}",
        f"paths.output_dir={root / 'run'}",
        "data.source.n_users=200",
        "data.source.n_items=150",
        "data.source.n_interactions=3000",
        "data.image_size=16",
        "model.dim=16",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "~callbacks.lr_monitor",
        "logger=none",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    metrics = train(cfg)
    return Path(metrics["best_checkpoint"])


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def exports(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """One export folder per ``configs/index/*.yaml``."""
    from towerrec.retrieval import export_index

    root = tmp_path_factory.mktemp("exports")
    return {
        name: export_index(tiny_ckpt, index_spec(name), root / name, n_queries=200) for name in INDEX_CONFIGS
    }
