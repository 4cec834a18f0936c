"""towerrec: two-tower retrieval recommenders with image, content and purchase-sequence towers."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent


def _source_checkout() -> Path | None:
    """The repository root when the package runs from a source checkout (``src/towerrec`` beside
    ``configs/`` and ``pyproject.toml``), else None (an installed package)."""
    root = _PACKAGE.parents[1]
    is_checkout = _PACKAGE.parent.name == "src" and (root / "configs").is_dir() and (root / "pyproject.toml").is_file()
    return root if is_checkout else None


#: The source checkout this package runs from, or None when it is installed (``pip install .``, a wheel).
SOURCE_CHECKOUT = _source_checkout()

#: Where outputs go (``outputs/``, ``multirun/``, ``data/processed/``): ``TOWERREC_ROOT`` when set,
#: else the source checkout, else the current working directory at start-up.
PROJECT_ROOT = Path(os.environ.get("TOWERREC_ROOT") or SOURCE_CHECKOUT or Path.cwd()).resolve()

#: The package's configs: ``configs/`` at the top of a checkout (where users edit them); in an
#: installed package, the copy the build puts into ``towerrec/configs`` (see setup.py).
CONFIG_DIR = str(SOURCE_CHECKOUT / "configs" if SOURCE_CHECKOUT else _PACKAGE / "configs")

if not OmegaConf.has_resolver("towerrec_root"):
    OmegaConf.register_new_resolver("towerrec_root", lambda: str(PROJECT_ROOT))
