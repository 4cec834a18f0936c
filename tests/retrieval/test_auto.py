"""index=auto: exact search for small catalogues, a graph above, inverted lists from 1M; the reason recorded."""

from __future__ import annotations

import numpy as np
import pytest

from towerrec.retrieval import load_export
from towerrec.retrieval.index import auto_factory, build_index, normalized

from .conftest import index_spec


def test_auto_factory_follows_the_catalogue_size():
    spec = index_spec("auto")
    flat_below, ivf_from = spec.flat_below, spec.ivf_from
    assert 0 < flat_below < ivf_from
    assert auto_factory(flat_below - 1, flat_below, ivf_from)[0] == "Flat"
    assert auto_factory(flat_below, flat_below, ivf_from)[0] == "HNSW32,Flat"
    assert auto_factory(ivf_from - 1, flat_below, ivf_from)[0] == "HNSW32,Flat"
    factory, reason = auto_factory(10_000_000, flat_below, ivf_from)
    assert factory == "IVF{nlist},Flat" and "10,000,000" in reason
    with pytest.raises(ValueError, match="flat_below"):
        auto_factory(10, None, ivf_from)


def test_auto_resolves_nlist_from_its_training_sample():
    spec = index_spec("auto").resolve(10_000_000, 64)
    assert spec.factory_string() == f"IDMap2,IVF{spec.nlist},Flat"
    # 4 * sqrt(N) lists, at most one per 39 training vectors
    assert spec.nlist == min(round(4 * np.sqrt(10_000_000)), spec.train_sample // 39)
    assert "IVF" in spec.reason


def test_auto_builds_a_graph_above_flat_below():
    spec = index_spec("auto", flat_below=100)
    x = normalized(np.random.default_rng(0).standard_normal((300, 8)))
    built = build_index(spec, x, np.arange(1, 301))
    assert built.factory == "IDMap2,HNSW32,Flat" and "graph" in built.spec.reason


def test_default_export_is_auto_and_says_why(exports):
    index = load_export(exports["auto"])
    m = index.manifest
    assert index_spec("auto").name == "auto"
    assert m["factory"] == "IDMap2,Flat"  # 150 items: exact
    assert m["index"]["choice"].startswith("auto: 150 items < flat_below")
    assert m["operating_point"]["recall"] == {"user": 1.0, "item": 1.0}


def test_auto_keeps_the_cheaper_of_the_tuned_graph_and_exact_search():
    from towerrec.retrieval.index import exact_search
    from towerrec.retrieval.tune import tune_built
    from towerrec.retrieval.vectors import clustered_unit

    x = clustered_unit(3000, 16, seed=0)
    ids = np.arange(1, len(x) + 1)
    q = clustered_unit(200, 16, seed=1)
    sets = {"user": (q, exact_search(x, ids, q, 10)), "item": (x[:200], exact_search(x, ids, x[:200], 10))}
    built = build_index(index_spec("auto", flat_below=100), x, ids)
    assert built.factory == "IDMap2,HNSW32,Flat"
    kept, tuned = tune_built(built, x, ids, sets, 10, 0.95, "index=auto")
    exact = [p for p in tuned.explored if p.params == {}]
    graph = [p for p in tuned.explored if p.params and min(p.recall.values()) >= 0.95]
    assert len(exact) == 1 and graph
    if kept.factory == "IDMap2,Flat":
        assert tuned.chosen is exact[0] and "exact search costs" in kept.spec.reason
        assert min(p.ms_per_query for p in graph) >= exact[0].ms_per_query
    else:
        assert tuned.chosen.ms_per_query < exact[0].ms_per_query
        assert tuned.chosen.ms_per_query == min(p.ms_per_query for p in graph)
    assert min(tuned.chosen.recall.values()) >= 0.95


def test_auto_falls_back_to_exact_search_when_the_index_misses_the_target():
    from dataclasses import replace

    from towerrec.retrieval.index import exact_search
    from towerrec.retrieval.tune import tune_built
    from towerrec.retrieval.vectors import clustered_unit

    x = clustered_unit(3000, 16, seed=0)
    ids = np.arange(1, len(x) + 1)
    sets = {"item": (x[:100], exact_search(x, ids, x[:100], 10))}
    # An index auto could have chosen that no setting brings to the target: a coarse PQ code.
    coarse = replace(index_spec("auto"), factory="PQ2x4", reason="auto: a coarse code")
    built = build_index(coarse, x, ids)
    kept, tuned = tune_built(built, x, ids, sets, 10, 0.99, "index=auto")
    assert kept.factory == "IDMap2,Flat" and tuned.chosen.recall == {"item": 1.0}
    assert kept.spec.reason.startswith("auto: measured at export, index=auto: no search setting reaches")
    with pytest.raises(ValueError, match="no search setting"):  # without auto the export stops instead
        tune_built(build_index(replace(coarse, reason=None), x, ids), x, ids, sets, 10, 0.99, "index=pq")
