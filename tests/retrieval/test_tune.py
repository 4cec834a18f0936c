"""Operating points: the cheapest search setting that reaches index.target_recall, measured."""

from __future__ import annotations

from dataclasses import replace

import faiss
import numpy as np
import pytest
import torch

from towerrec.models.checkpoint import load_trained
from towerrec.retrieval import ExportError, load_export
from towerrec.retrieval.index import exact_search, normalized
from towerrec.retrieval.tune import TargetRecallError, measure, parameter_ranges, tune
from towerrec.retrieval.writer import export_index, tuning_queries

from .conftest import index_spec


def _clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = normalized(rng.standard_normal((clusters, d)))
    return normalized(centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d))


def test_parameter_ranges_come_from_faiss_and_reach_exhaustive_search():
    ivf = faiss.index_factory(16, "IDMap2,IVF20,PQ4x4,RFlat", faiss.METRIC_INNER_PRODUCT)
    ranges = dict(parameter_ranges(ivf))
    assert set(ranges) == {"nprobe", "k_factor_rf"}  # FAISS's names, without the polysemous threshold
    assert ranges["nprobe"][0] == 1 and ranges["nprobe"][-1] == 20  # up to every list
    assert ranges["nprobe"] == sorted(ranges["nprobe"])
    hnsw = dict(parameter_ranges(faiss.index_factory(16, "IDMap2,HNSW8,Flat", faiss.METRIC_INNER_PRODUCT)))
    assert hnsw["efSearch"][-1] == 4096
    assert parameter_ranges(faiss.index_factory(16, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)) == []


def test_tune_picks_the_cheapest_setting_that_reaches_the_target():
    x = _clustered(6000, 16, 40)
    ids = np.arange(1, len(x) + 1)
    index = faiss.index_factory(16, "IDMap2,IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, ids)
    q_item = x[:300]
    q_user = _clustered(300, 16, 40, seed=1)
    sets = {"user": (q_user, exact_search(x, ids, q_user, 10)), "item": (q_item, exact_search(x, ids, q_item, 10))}
    tuned = tune(index, sets, 10, 0.95)
    nprobe = tuned.chosen.params["nprobe"]
    assert min(tuned.chosen.recall.values()) >= 0.95
    # Measured again on the index as tune left it: the target is reached ...
    again = measure(index, sets, 10, {})
    assert again.recall == tuned.chosen.recall
    # ... and the FAISS value just below misses it (so nothing cheaper on this range would do).
    values = dict(parameter_ranges(index))["nprobe"]
    assert nprobe > values[0]
    below = measure(index, sets, 10, {"nprobe": values[values.index(nprobe) - 1]})
    assert min(below.recall.values()) < 0.95
    assert len(tuned.explored) < len(values)  # the settings above the chosen one were never searched


def test_tune_refuses_an_unreachable_target_in_one_line():
    x = _clustered(2000, 16, 10)
    ids = np.arange(1, len(x) + 1)
    index = faiss.index_factory(16, "IDMap2,PQ2x4", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, ids)
    sets = {"item": (x[:200], exact_search(x, ids, x[:200], 10))}
    with pytest.raises(TargetRecallError, match=r"no search setting reaches recall@10 0.99 \(best: item 0\.\d+") as err:
        tune(index, sets, 10, 0.99, what="index=coarse")
    assert "\n" not in str(err.value) and "index=flat" in str(err.value)
    with pytest.raises(ValueError, match="target_recall"):
        tune(index, sets, 10, 1.5)


def test_export_records_and_applies_its_operating_point(exports, tiny_ckpt):
    """On the tiny real export: the chosen nprobe reaches the target on the export's own tuning
    queries, measured again through load_export, and one step less does not."""
    index = load_export(exports["ivf_flat"])
    point = index.manifest["operating_point"]
    assert point["target_recall"] == 0.95 and set(point["recall"]) == {"user", "item"}
    assert point["queries_per_s"] > 0 and point["explored"]
    model, dm = load_trained(tiny_ckpt)
    item_emb = model.item_tower.embed_all()
    ids = index.items["item_idx"].to_numpy()
    with torch.no_grad():
        sets = tuning_queries(model, dm, item_emb, index.embeddings, ids, 10, 200, seed=0)
    measured = measure(index.index, sets, 10, {})  # the loaded index, with what load_export applied
    assert measured.recall == pytest.approx(point["recall"], abs=1e-4)
    assert min(measured.recall.values()) >= 0.95
    values = dict(parameter_ranges(index.index))["nprobe"]
    nprobe = point["params"]["nprobe"]
    if nprobe > values[0]:
        below = measure(index.index, sets, 10, {"nprobe": values[values.index(nprobe) - 1]})
        assert min(below.recall.values()) < 0.95


def test_export_stops_when_no_setting_reaches_the_target(tiny_ckpt, tmp_path):
    spec = replace(index_spec("flat"), name="coarse", factory="PQ2x4", target_recall=0.99)
    with pytest.raises(ExportError, match=r"no search setting reaches recall@10 0.99 \(best: user ") as err:
        export_index(tiny_ckpt, spec, tmp_path / "coarse", n_queries=100)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "coarse").exists()
