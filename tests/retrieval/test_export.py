"""Export -> load -> query round trips on a tiny trained checkpoint, and refusal of tampered exports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from towerrec.models.checkpoint import load_trained
from towerrec.retrieval import ExportError, UnknownItemError, load_export
from towerrec.retrieval.folder import manifest_digest
from towerrec.retrieval.index import measure_recall
from towerrec.retrieval.recommend import Recommender
from towerrec.retrieval.writer import export_index

from .conftest import INDEX_CONFIGS, index_spec, train_tiny


@pytest.mark.parametrize("name", INDEX_CONFIGS)
def test_round_trip(exports, name):
    index = load_export(exports[name])
    m = index.manifest
    assert m["metric"] == "inner_product" and m["factory"].startswith("IDMap2,")
    assert m["count"] == len(index) == index.index.ntotal == 150
    assert m["dim"] == 16 and index.embeddings.shape == (150, 16)
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-4)
    assert set(m["files"]) == {"index.faiss", "item_ids.parquet", "item_embeddings.npy"}
    # The loaded index answers as the built one did: the recall recorded at export is reproduced
    # (the export's item queries were the whole 150-item catalogue).
    ids = index.items["item_idx"].to_numpy()
    assert m["recall"]["item_queries"] == 150
    assert measure_recall(index.index, index.embeddings, ids, index.embeddings, 10) == pytest.approx(
        m["recall"]["recall_item"]
    )
    # Exact search is exact; the others are tuned to recall 0.95 on other queries (test_tune.py).
    assert m["recall"]["recall_item"] >= (0.99 if name == "flat" else 0.9 if name in ("hnsw", "ivf_flat") else 0.5)
    assert set(m["versions"]) >= {"faiss", "torch", "towerrec"}
    assert m["build_seconds"] >= 0 and m["checkpoint"]["sha256"]

    query = index.items["item_id"].iloc[0]
    hits = index.similar_items(query, k=5)
    assert len(hits) == 5 and query not in [h.item_id for h in hits]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # The index answers as the exported embeddings do: scores are their inner products.
    for h in hits:
        assert h.score == pytest.approx(float(index.embedding(h.item_id) @ index.embedding(query)), abs=0.05)


def test_export_holds_every_item_and_cold_items_skip_their_id_embedding(exports, tiny_ckpt):
    index = load_export(exports["flat"])
    model, dm = load_trained(tiny_ckpt)
    items = index.items
    assert items["item_id"].tolist() == dm.items.sort_values("item_idx")["item_id"].astype(str).tolist()
    assert items["is_cold"].sum() == dm.items["is_cold"].sum() > 0  # never-bought items are in
    assert np.allclose(index.embeddings, model.item_tower.embed_all()[1:].numpy(), atol=1e-5)

    cold = torch.from_numpy(np.r_[False, items["is_cold"].to_numpy()])
    with torch.no_grad():
        model.item_tower.id_encoder.embedding.weight[cold] += 10.0
    again = model.item_tower.embed_all()[1:].numpy()
    assert np.allclose(again[cold[1:].numpy()], index.embeddings[items["is_cold"].to_numpy()], atol=1e-5)


def test_similar_items_exclude(exports):
    index = load_export(exports["hnsw"])
    query = index.items["item_id"].iloc[3]
    first = [h.item_id for h in index.similar_items(query, k=4)]
    again = [h.item_id for h in index.similar_items(query, k=4, exclude=first[:2])]
    assert query not in again and not set(first[:2]) & set(again)
    assert again[:2] == first[2:]
    with pytest.raises(UnknownItemError, match="nope"):
        index.similar_items("nope")


def test_recommend_explains_with_history(exports):
    index = load_export(exports["hnsw"])
    history = index.items["item_id"].iloc[[5, 17, 40]].tolist()
    rec = Recommender(index)
    hits = rec.recommend(history, k=6)
    assert len(hits) == 6 and not set(history) & {h.item_id for h in hits}
    for h in hits:
        sims = [float(index.embedding(h.item_id) @ index.embedding(i)) for i in history]
        assert h.because == history[int(np.argmax(sims))]
        assert h.because_score == pytest.approx(max(sims), abs=1e-5)
        assert h.to_dict()["because"] == h.because
    # The whole catalogue back: exact search (a tuned HNSW need not visit all 150 items for k=150).
    kept = Recommender(load_export(exports["flat"])).recommend(history, k=150, exclude_history=False)
    assert set(history) <= {h.item_id for h in kept}
    with pytest.raises(ValueError, match="empty"):
        rec.recommend([], k=3)


def test_recommend_refuses_a_changed_checkpoint(exports, tmp_path):
    root = tmp_path / "moved"
    shutil.copytree(exports["flat"], root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["checkpoint"]["sha256"] = "0" * 64
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    index = load_export(root)
    with pytest.raises(ExportError, match="sha256 mismatch"):
        Recommender(index)


def _copy(exports, tmp_path, name="flat"):
    root = tmp_path / name
    shutil.copytree(exports[name], root)
    return root


def _rewrite_manifest(root, change, reseal=True):
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    if reseal:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_edited_manifest_is_refused(exports, tmp_path):
    root = _copy(exports, tmp_path)
    _rewrite_manifest(root, lambda m: m.update(count=149), reseal=False)
    with pytest.raises(ExportError, match="edited after export") as err:
        load_export(root)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(dim=32), "dimension"),
        (lambda m: m.update(count=149), "149"),
        (lambda m: m.update(metric="l2"), "metric"),
        (lambda m: m["files"]["index.faiss"].update(sha256="0" * 64), "index.faiss sha256"),
        (lambda m: m.pop("factory"), "lacks factory"),
    ],
)
def test_mismatched_manifest_is_refused(exports, tmp_path, change, message):
    root = _copy(exports, tmp_path)
    _rewrite_manifest(root, change)
    with pytest.raises(ExportError, match=message):
        load_export(root)


def test_tampered_files_are_refused(exports, tmp_path):
    root = _copy(exports, tmp_path)
    emb = np.load(root / "item_embeddings.npy")
    emb[0] *= -1
    np.save(root / "item_embeddings.npy", emb)
    with pytest.raises(ExportError, match="item_embeddings.npy sha256"):
        load_export(root)

    root = _copy(exports, tmp_path / "b")
    items = pd.read_parquet(root / "item_ids.parquet")
    items.loc[0, "title"] = "x" * len(items.loc[0, "title"])
    items.to_parquet(root / "item_ids.parquet", index=False)
    with pytest.raises(ExportError, match="item_ids.parquet"):
        load_export(root)

    root = _copy(exports, tmp_path / "c")
    (root / "index.faiss").unlink()
    with pytest.raises(ExportError, match="index.faiss is missing"):
        load_export(root)
    with pytest.raises(ExportError, match="no manifest.json"):
        load_export(tmp_path / "nowhere")


def test_export_does_not_overwrite_unless_asked(exports, tiny_ckpt):
    before = (exports["flat"] / "manifest.json").read_text()
    with pytest.raises(ExportError, match="already exists"):
        export_index(tiny_ckpt, index_spec("flat"), exports["flat"])
    assert (exports["flat"] / "manifest.json").read_text() == before
    leftovers = [p.name for p in exports["flat"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary folders left behind


@pytest.mark.slow
def test_export_with_content_sketch_serves_the_models_own_scores(tmp_path):
    sketch = "{_target_: towerrec.models.components.content_sketch.ContentSketch, dim: 32, weight: 2.0}"
    ckpt = train_tiny(tmp_path / "train", f"model.item_tower.sketch={sketch}")
    out = export_index(ckpt, index_spec("flat"), tmp_path / "export", n_queries=50)
    index = load_export(out)
    assert index.manifest["dim"] == 16 + 32 and index.embeddings.shape == (150, 48)
    model, dm = load_trained(ckpt)
    item_emb = model.item_tower.embed_all()
    assert np.allclose(index.embeddings, item_emb[1:].numpy(), atol=1e-5)  # already unit norm
    history = dm.test_split.history[:3]
    with torch.no_grad():
        user = model.user_embeddings(history, item_emb)
    assert user.shape == (3, 48) and torch.allclose(user.norm(dim=-1), torch.ones(3), atol=1e-5)
    raw = [str(i) for i in dm.items.set_index("item_idx").loc[history[0][history[0] > 0].tolist(), "item_id"]]
    # The served query (weights only, sketches read back from the export) is the model's own.
    rec = Recommender(index)
    assert np.allclose(rec.user_vector(raw), user[0].numpy(), atol=1e-5)
    hits = rec.recommend(raw, k=5)
    assert len(hits) == 5 and all(h.because for h in hits)
