"""Where configs and outputs are found: in a source checkout, and in an installed package.

The full wheel install (``python -m build``, a fresh venv, every entry point from another folder)
is ``.ci/install_check``, which CI runs; this test checks the same rules in seconds by laying the
package out as an installation does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import towerrec

SRC = Path(towerrec.__file__).resolve().parent


def test_a_source_checkout_uses_its_top_level_configs():
    assert towerrec.SOURCE_CHECKOUT == SRC.parents[1]
    assert Path(towerrec.CONFIG_DIR) == SRC.parents[1] / "configs"
    assert (Path(towerrec.CONFIG_DIR) / "train.yaml").is_file()


def test_an_installed_package_uses_its_packaged_configs_and_the_working_directory(tmp_path):
    site = tmp_path / "site-packages"
    shutil.copytree(SRC, site / "towerrec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(towerrec.CONFIG_DIR), site / "towerrec" / "configs")  # what setup.py's build step does
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import towerrec\n"
        "from hydra import compose, initialize_config_dir\n"
        "with initialize_config_dir(config_dir=towerrec.CONFIG_DIR, version_base='1.3'):\n"
        "    cfg = compose(config_name='train')\n"
        "print(towerrec.SOURCE_CHECKOUT, towerrec.CONFIG_DIR, towerrec.PROJECT_ROOT, cfg.data.processed_dir, sep='\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TOWERREC_ROOT",)}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkout, config_dir, root, processed = proc.stdout.split("\n")[:4]
    assert checkout == "None"
    assert Path(config_dir) == site / "towerrec" / "configs"
    assert Path(root) == work.resolve()
    assert Path(processed) == work.resolve() / "data" / "processed" / "synthetic"
