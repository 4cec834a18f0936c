"""``towerrec-export``: checkpoint -> item embeddings -> FAISS index folder with a verified manifest."""

from __future__ import annotations

import json

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from towerrec.commands.common import hydra_cli
from towerrec.retrieval.folder import MANIFEST_FILE, ExportError
from towerrec.retrieval.writer import export_index


def run(cfg: DictConfig) -> None:
    """Export ``cfg.ckpt_path`` with ``cfg.index`` and print the manifest's headline."""
    out = export_index(
        cfg.ckpt_path,
        instantiate(cfg.index),
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
        users=cfg.get("users", False),
    )
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    keys = ("factory", "count", "cold_count", "dim", "build_seconds", "recall")
    if manifest.get("customer_data"):  # users=true
        manifest["customers"] = {k: manifest["customers"][k] for k in ("count", "factory", "recall")}
        keys = (*keys, "customers")
    headline = {k: manifest[k] for k in keys}
    headline["operating_point"] = {k: v for k, v in manifest["operating_point"].items() if k != "explored"}
    print(f"{out}\n{json.dumps(headline, indent=2)}")


main = hydra_cli("export", run, (ExportError, ValueError))


if __name__ == "__main__":
    main()
