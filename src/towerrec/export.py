"""``towerrec-export``: checkpoint -> item embeddings -> FAISS index folder with a verified manifest."""

from __future__ import annotations

import json
import logging
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from towerrec import CONFIG_DIR
from towerrec.retrieval.export import export_index
from towerrec.retrieval.manifest import MANIFEST_FILE, ExportError

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def _main(cfg: DictConfig) -> None:
    spec = instantiate(cfg.index)
    try:
        out = export_index(
            cfg.ckpt_path,
            spec,
            cfg.out_dir,
            processed_dir=cfg.processed_dir,
            device=cfg.device,
            recall_k=cfg.recall.k,
            n_queries=cfg.recall.queries,
            seed=cfg.seed,
            overwrite=cfg.overwrite,
            config=OmegaConf.to_container(cfg, resolve=True),
            warn_below=cfg.recall.warn_below,
            force=cfg.force,
        )
    except (ExportError, ValueError) as err:
        log.error("%s", err)
        sys.exit(f"error: {err}")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    keys = ("factory", "count", "cold_count", "dim", "build_seconds", "recall")
    print(f"{out}\n{json.dumps({k: manifest[k] for k in keys}, indent=2)}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
