"""Index specs, device choice and recall against exact search, on random vectors (no model)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from towerrec.retrieval.index import (
    IndexSpec,
    ann_recall,
    build_index,
    measure_recall,
    mmap_flags,
    normalized,
    read_index,
    search,
    select_faiss_device,
    set_params,
)

from .conftest import INDEX_CONFIGS, index_spec


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return normalized(np.random.default_rng(seed).standard_normal((n, d)))


@pytest.mark.parametrize(
    ("requested", "num_gpus", "factory", "device"),
    [
        ("auto", 0, "IDMap2,IVF64,Flat", "cpu"),
        (True, 0, "IDMap2,IVF64,Flat", "cpu"),
        ("auto", 1, "IDMap2,IVF64,Flat", "gpu"),
        ("true", 2, "IDMap2,IVF64,PQ16x8,RFlat", "gpu"),
        (False, 4, "IDMap2,Flat", "cpu"),
        ("auto", 1, "IDMap2,HNSW32,Flat", "cpu"),
        (True, 1, "IDMap2,HNSW32,Flat", "cpu"),
    ],
)
def test_select_faiss_device(requested, num_gpus, factory, device):
    chosen, reason = select_faiss_device(requested, num_gpus, factory)
    assert chosen == device
    assert reason and "\n" not in reason
    if "HNSW" in factory and num_gpus and requested:
        assert "HNSW" in reason


def test_select_faiss_device_rejects_nonsense():
    with pytest.raises(ValueError, match="gpu must be"):
        select_faiss_device("maybe", 1, "Flat")


def test_resolve_auto_sizes():
    spec = IndexSpec(
        name="t", factory="IVF{nlist},PQ{pq_m}x{pq_nbits},RFlat", nlist="auto", pq_m="auto", pq_nbits="auto"
    )
    big = spec.resolve(1_000_000, 64)
    assert (big.nlist, big.pq_m, big.pq_nbits) == (4000, 16, 8)
    assert big.factory_string() == "IDMap2,IVF4000,PQ16x8,RFlat"
    sampled = IndexSpec(name="t", factory="IVF{nlist},Flat", nlist="auto", train_sample=10_000).resolve(
        1_000_000, 64
    )
    assert sampled.nlist == 10_000 // 39  # every list gets >= 39 training vectors
    tiny = spec.resolve(150, 16)
    assert tiny.nlist == 3 and tiny.pq_m == 4 and tiny.pq_nbits == 1
    assert IndexSpec(name="f", factory="Flat").resolve(10, 8).factory_string() == "IDMap2,Flat"
    with pytest.raises(ValueError, match="needs nlist"):
        IndexSpec(name="t", factory="IVF{nlist},Flat").resolve(100, 8)


@pytest.mark.parametrize("name", INDEX_CONFIGS)
def test_every_config_builds_and_finds_item_ids(name):
    x = _unit(3000, 32)
    ids = np.arange(101, 3101)
    built = build_index(index_spec(name), x, ids, num_gpus=0)
    assert built.device == "cpu"
    assert built.index.ntotal == 3000 and built.index.metric_type == faiss.METRIC_INNER_PRODUCT
    scores, found = search(built.index, x[:20], 5)
    assert found.shape == (20, 5)
    assert set(found.ravel()) <= set(ids)
    assert (found[:, 0] == ids[:20]).mean() >= 0.9  # a vector's nearest neighbour is itself
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    assert measure_recall(built.index, x, ids, _unit(100, 32, seed=1), 10) >= (
        0.999 if name == "flat" else 0.6
    )


def test_build_refuses_unnormalised_vectors_and_unknown_params():
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(IndexSpec(name="f", factory="Flat"), x, np.arange(1, 101))
    one_off = normalized(x)
    one_off[-1] *= 1.01  # the last row alone, 2% off in squared norm: every row is checked
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(IndexSpec(name="f", factory="Flat"), one_off, np.arange(1, 101))  # checked beside the add
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(IndexSpec(name="i", factory="IVF2,Flat"), one_off, np.arange(1, 101))  # before training
    with pytest.raises(ValueError, match="efSearch"):
        build_index(
            IndexSpec(name="f", factory="Flat", search_params={"efSearch": 10}),
            normalized(x),
            np.arange(1, 101),
        )


def test_ann_recall_by_hand():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[1, 2, 9, 10], [8, 7, 6, 5]])
    assert ann_recall(found, exact, 4) == pytest.approx((0.5 + 1.0) / 2)
    assert ann_recall(np.array([[-1, -1, 3, 4]]), exact[:1], 4) == pytest.approx(0.5)


@pytest.mark.parametrize(("factory", "same_answers"), [("Flat", True), ("IVF8,Flat", True), ("HNSW8,Flat", False)])
def test_an_add_in_chunks_builds_the_index_of_one_add(factory, same_answers):
    """IVF and graph indexes are added ``add_chunk`` vectors at a time (bounded temporaries); a flat
    one in one call (each add copies its whole array). Either way the index holds every vector, once,
    under its own id; flat and IVF answer as the index built in one add does (a graph built in
    batches links its nodes in another order)."""
    x, ids = _unit(500, 16), np.arange(1, 501) * 3
    spec = IndexSpec(name="t", factory=factory, train_sample=500)
    whole = build_index(spec, x, ids).index
    chunked = build_index(IndexSpec(name="t", factory=factory, train_sample=500, add_chunk=7), x, ids).index
    assert chunked.ntotal == whole.ntotal == 500
    q = _unit(20, 16, seed=1)
    if same_answers:
        for a, b in zip(search(whole, q, 10), search(chunked, q, 10), strict=True):
            np.testing.assert_array_equal(a, b)
    assert set(search(chunked, x[:50], 1)[1][:, 0].tolist()) == set(ids[:50].tolist())  # each finds itself


def test_a_mapped_ivf_index_searches_without_prefetch_threads(tmp_path):
    """A mapped IVF index (``OnDiskInvertedLists``) would start up to 32 threads per search to prefetch
    the probed lists; ``read_index`` turns them off and the answers stay those of the in-memory index."""
    x = _unit(2000, 16)
    built = build_index(IndexSpec(name="i", factory="IVF16,Flat"), x, np.arange(1, 2001))
    path = tmp_path / "index.faiss"
    faiss.write_index(built.index, str(path))
    mapped = read_index(path, mmap_flags(built.factory))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.prefetch_nthread == 0
    plain = faiss.read_index(str(path), mmap_flags(built.factory))  # FAISS's own default
    assert faiss.downcast_InvertedLists(faiss.extract_index_ivf(plain).invlists).prefetch_nthread > 0
    set_params(mapped, {"nprobe": 4})
    set_params(built.index, {"nprobe": 4})
    q = _unit(50, 16, seed=3)
    np.testing.assert_array_equal(search(mapped, q, 10)[1], search(built.index, q, 10)[1])
