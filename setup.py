"""Build hook: ship the top-level ``configs/`` inside the package as ``towerrec/configs``.

``configs/`` stays at the top of the repository, where users edit it; a wheel (and ``pip install .``)
carries a copy, which :data:`towerrec.CONFIG_DIR` uses when the package is not a source checkout.
Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_configs(build_py):  # noqa: N801 (setuptools command naming)
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads configs/ from the checkout itself
        target = os.path.join(self.build_lib, "towerrec", "configs")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "configs"), target, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": build_py_with_configs})
