"""``towerrec-data-report data=<name>``: prepare the data if needed, then write its data report."""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig

from towerrec import CONFIG_DIR
from towerrec.data.prepare import ensure_prepared
from towerrec.data.report import write_report
from towerrec.data.schema import DataError

log = logging.getLogger(__name__)

#: The summary.json keys printed on the console.
HEADLINE = (
    "users",
    "items",
    "items_never_interacted",
    "cold_items",
    "interactions",
    "splits",
    "sparsity",
    "date_range",
    "split",
    "image_coverage",
)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="data_report")
def _main(cfg: DictConfig) -> None:
    try:
        processed = ensure_prepared(cfg.data, workers=cfg.workers)
    except DataError as err:
        log.error("%s", err)
        sys.exit(f"error: {err}")
    report = write_report(processed, cfg.out_dir)
    summary = json.loads((report.parent / "summary.json").read_text())
    headline = {k: summary[k] for k in HEADLINE}
    headline["cold_test"] = {
        k: summary["cold"]["test"][k]
        for k in ("cold_interaction_share", "cold_target_share", "users", "users_with_cold_target")
    }
    headline["top_item_shares"] = {k: v for k, v in summary["popularity"].items() if k.startswith("top_")}
    print(f"{report}\n{json.dumps(headline, indent=2)}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
