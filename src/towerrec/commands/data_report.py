"""``towerrec-data-report data=<name>``: prepare the data if needed, then write its data report."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from towerrec.commands.common import hydra_cli
from towerrec.data.build import ensure_prepared
from towerrec.data.profile import write_report
from towerrec.data.schema import DataError

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


def run(cfg: DictConfig) -> None:
    """Prepare ``cfg.data`` if needed, write its report and print the headline figures."""
    processed = ensure_prepared(cfg.data, workers=cfg.workers)
    report = write_report(processed, cfg.out_dir)
    summary = json.loads((report.parent / "summary.json").read_text())
    headline = {k: summary[k] for k in HEADLINE}
    headline["cold_test"] = {
        k: summary["cold"]["test"][k]
        for k in ("cold_interaction_share", "cold_target_share", "users", "users_with_cold_target")
    }
    headline["top_item_shares"] = {k: v for k, v in summary["popularity"].items() if k.startswith("top_")}
    print(f"{report}\n{json.dumps(headline, indent=2)}")


main = hydra_cli("data_report", run, (DataError,))


if __name__ == "__main__":
    main()
