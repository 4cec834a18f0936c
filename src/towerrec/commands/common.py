"""What every Hydra console script shares: the config folder, and one line for the user's own mistakes."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from towerrec import CONFIG_DIR


def hydra_cli(
    config_name: str,
    run: Callable[[DictConfig], Any],
    user_errors: tuple[type[BaseException], ...] = (ValueError,),
) -> Callable[[], Any]:
    """The ``main`` of a console script: compose ``configs/<config_name>.yaml`` with the command line
    and call ``run(cfg)``; an error in ``user_errors`` (bad input, a refused file) exits with one
    ``error: ...`` line instead of a traceback.

    The Hydra job is named after ``run``'s module (``towerrec.commands.train`` -> ``outputs/train/...``).
    """

    @functools.wraps(run)  # Hydra names the job after the wrapped function's module
    def task(cfg: DictConfig) -> Any:
        try:
            return run(cfg)
        except user_errors as err:
            logging.getLogger(run.__module__).error("%s", err)
            sys.exit(f"error: {err}")

    return hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(task)
