"""``towerrec-prepare data=<name>``: build the processed folder of a data source."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from towerrec.backtest import fold_data_configs, is_rolling
from towerrec.commands.common import hydra_cli
from towerrec.data.build import PrepareSettings, prepare, read_manifest
from towerrec.data.schema import DataError


def run(cfg: DictConfig) -> None:
    """Prepare ``cfg.data`` (every fold's folder for a rolling split) and print each manifest's summary."""
    datas = fold_data_configs(cfg.data) if is_rolling(cfg.data) else [cfg.data]
    for out in [prepare(PrepareSettings.from_config(d), force=cfg.force, workers=cfg.workers) for d in datas]:
        manifest = read_manifest(out)
        summary = {k: manifest[k] for k in ("counts", "split", "skipped", "repaired", "images", "seconds")}
        print(f"{out}\n{json.dumps(summary, indent=2)}")


main = hydra_cli("prepare", run, (DataError,))

if __name__ == "__main__":
    main()
