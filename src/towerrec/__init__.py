"""towerrec: two-tower retrieval recommenders with image, content and purchase-sequence towers."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

#: The repository root: the folder holding ``configs/``. ``TOWERREC_ROOT`` overrides it.
PROJECT_ROOT = Path(os.environ.get("TOWERREC_ROOT", Path(__file__).resolve().parents[2]))
CONFIG_DIR = str(PROJECT_ROOT / "configs")

if not OmegaConf.has_resolver("towerrec_root"):
    OmegaConf.register_new_resolver("towerrec_root", lambda: str(PROJECT_ROOT))
