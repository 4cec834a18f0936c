"""FAISS on a GPU (``gpu: auto``): built and searched there, same answers as on CPU. Needs the gpu extra."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from towerrec.retrieval import load_export
from towerrec.retrieval.index import build_index, search, select_faiss_device
from towerrec.retrieval.vectors import clustered_unit

from .conftest import index_spec

pytestmark = pytest.mark.skipif(
    faiss.get_num_gpus() == 0,
    reason="needs CUDA: no GPU visible to FAISS (faiss-cpu build or no device); pip install -e '.[gpu]' on a CUDA machine",
)


def test_ivf_builds_and_searches_on_gpu_with_the_cpu_answers():
    x = clustered_unit(20000, 32, seed=0)
    ids = np.arange(1, len(x) + 1)
    on_gpu = build_index(index_spec("ivf_flat"), x, ids, keep_on_device=True)
    assert on_gpu.device == "gpu"
    on_cpu = build_index(index_spec("ivf_flat", gpu=False), x, ids)
    assert on_cpu.device == "cpu"
    _, found_gpu = search(on_gpu.index, x[:100], 10)
    _, found_cpu = search(faiss.index_gpu_to_cpu(on_gpu.index), x[:100], 10)
    assert (found_gpu == found_cpu).mean() > 0.99


def test_load_export_searches_on_gpu(exports):
    cpu = load_export(exports["ivf_flat"])
    gpu = load_export(exports["ivf_flat"], gpu="auto")
    assert select_faiss_device("auto", faiss.get_num_gpus(), gpu.manifest["factory"])[0] == "gpu"
    q = cpu.embeddings[:20]
    assert (gpu.search(q, 5)[1] == cpu.search(q, 5)[1]).mean() > 0.99
