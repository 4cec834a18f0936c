"""``towerrec-prepare data=<name>``: build the processed folder of a data source."""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig

from towerrec import CONFIG_DIR
from towerrec.backtest import fold_data_configs, is_rolling
from towerrec.data.prepare import PrepareSettings, prepare, read_manifest
from towerrec.data.schema import DataError

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def _main(cfg: DictConfig) -> None:
    try:
        # A rolling split: one processed folder per fold (towerrec.backtest), each prepared as usual.
        datas = fold_data_configs(cfg.data) if is_rolling(cfg.data) else [cfg.data]
        outs = [prepare(PrepareSettings.from_config(d), force=cfg.force, workers=cfg.workers) for d in datas]
    except DataError as err:
        log.error("%s", err)
        sys.exit(f"error: {err}")
    for out in outs:
        manifest = read_manifest(out)
        summary = {k: manifest[k] for k in ("counts", "split", "skipped", "repaired", "images", "seconds")}
        print(f"{out}\n{json.dumps(summary, indent=2)}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
