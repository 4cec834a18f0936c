"""Import boundaries: verifying and querying an export item to item never loads the training stack."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINING_STACK = ("lightning", "pytorch_lightning", "towerrec.models", "towerrec.data.datamodule", "towerrec.commands.train")

PROBE = """
import json, sys
from towerrec.retrieval import load_export
index = load_export(sys.argv[1])
query = index.items["item_id"].iloc[0]
hits = index.similar_items(query, k=3)
print(json.dumps({"hits": len(hits), "modules": sorted(sys.modules)}))
"""


def test_item_to_item_query_imports_no_lightning_and_no_models(exports):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(exports["flat"])], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["hits"] == 3
    loaded = [m for m in out["modules"] if m.startswith(TRAINING_STACK)]
    assert loaded == [], f"an item-to-item query imported {loaded}"


def test_history_queries_load_the_user_model_through_the_one_loader(exports):
    from towerrec.retrieval import load_export
    from towerrec.retrieval.recommend import Recommender, load_model

    rec = Recommender(load_export(exports["flat"]))
    assert rec.model.__class__.__name__ == "TwoTowerModule" and not rec.model.training
    assert load_model.__module__ == "towerrec.models.checkpoint"
