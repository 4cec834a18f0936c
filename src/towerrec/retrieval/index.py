"""FAISS index specs, built from an ``index_factory`` string; device choice; ANN recall against exact search.

Every index holds L2-normalised float32 vectors under the inner-product metric (the score the towers are
trained with) and is wrapped in ``IDMap2`` so that a search returns the project's item indices and
``reconstruct(item_idx)`` works.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from towerrec.ranking import aggregate, rank_metrics

log = logging.getLogger(__name__)

METRIC = faiss.METRIC_INNER_PRODUCT
METRIC_NAME = "inner_product"
# FAISS warns when k-means gets fewer training points than this per centroid.
MIN_POINTS_PER_CENTROID = 39
# Index types with no GPU implementation in FAISS (their factory-string keys).
NO_GPU = ("HNSW", "NSG")


@dataclass
class IndexSpec:
    """One index configuration, from ``configs/index/<name>.yaml``.

    Args:
        name: the config's name (also names the default export folder).
        factory: an ``index_factory`` string without the ``IDMap2,`` prefix. It may hold ``{nlist}``,
            ``{pq_m}`` and ``{pq_nbits}``, filled in by :meth:`resolve` for the catalogue at hand.
        nlist: IVF lists; ``"auto"`` is ``4 * sqrt(N)``, capped so each list gets 39 training points.
        pq_m: PQ sub-quantizers; ``"auto"`` is the largest divisor of ``dim`` that is at most ``dim / 4``.
        pq_nbits: bits per PQ code; ``"auto"`` is 8, fewer when the training sample is too small for 256
            centroids per sub-quantizer.
        build_params: FAISS parameters set before adding vectors (``efConstruction``).
        search_params: FAISS parameters set for searching (``efSearch``, ``nprobe``, ``k_factor_rf``);
            with ``target_recall`` set, the export replaces them by the cheapest setting that reaches it.
        train_sample: vectors sampled to train trained indexes (IVF, PQ, SQ); None trains on all of them.
        gpu: ``auto`` uses a GPU when FAISS sees one, ``true`` asks for one, ``false`` never does.
        seed: the training-sample seed.
        flat_below: ``factory: auto``: exact ``Flat`` below this many items.
        ivf_from: ``factory: auto``: ``IVF{nlist},Flat`` from this many items, ``HNSW32,Flat`` between.
        add_chunk: vectors added per ``add_with_ids`` call (bounds the temporary memory of a large add).
        reason: why this factory string (filled in by :meth:`resolve` for ``factory: auto``).
        target_recall: recall@k against the model's exact ranking that user-history and item queries
            must each reach; the export measures and picks the search setting
            (:mod:`towerrec.retrieval.tune`). None keeps ``search_params`` as they are.
    """

    name: str
    factory: str
    nlist: int | str | None = None
    pq_m: int | str | None = None
    pq_nbits: int | str | None = None
    build_params: dict[str, float] = field(default_factory=dict)
    search_params: dict[str, float] = field(default_factory=dict)
    train_sample: int | None = None
    gpu: bool | str = "auto"
    seed: int = 0
    target_recall: float | None = 0.95
    flat_below: int | None = None
    ivf_from: int | None = None
    add_chunk: int = 1_000_000
    reason: str | None = None

    def resolve(self, n: int, dim: int) -> IndexSpec:
        """The spec with ``auto`` sizes (and an ``auto`` factory) worked out for ``n`` vectors of size ``dim``."""
        if self.factory == "auto":
            factory, reason = auto_factory(n, self.flat_below, self.ivf_from)
            spec = replace(self, factory=factory).resolve(n, dim)
            return replace(spec, reason=f"{reason} -> {spec.factory_string()}")
        n_train = min(n, self.train_sample) if self.train_sample else n
        nlist = self.nlist
        if nlist == "auto":
            nlist = max(1, min(round(4 * math.sqrt(n)), n_train // MIN_POINTS_PER_CENTROID))
        pq_m = self.pq_m
        if pq_m == "auto":
            pq_m = max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
        pq_nbits = self.pq_nbits
        if pq_nbits == "auto":
            pq_nbits = int(min(8, max(1, math.floor(math.log2(max(2, n_train // MIN_POINTS_PER_CENTROID))))))
        params = {"nlist": nlist, "pq_m": pq_m, "pq_nbits": pq_nbits}
        for key, value in params.items():
            if f"{{{key}}}" in self.factory and not isinstance(value, int):
                raise ValueError(
                    f"index {self.name!r}: factory {self.factory!r} needs {key} (an int or 'auto')"
                )
        return IndexSpec(**{**asdict(self), **params})

    def factory_string(self) -> str:
        """The full factory string, ``IDMap2,`` prefix included (call on a resolved spec)."""
        inner = self.factory.format(nlist=self.nlist, pq_m=self.pq_m, pq_nbits=self.pq_nbits)
        return inner if inner.startswith("IDMap") else f"IDMap2,{inner}"


def auto_factory(n: int, flat_below: int | None, ivf_from: int | None) -> tuple[str, str]:
    """``(factory, reason)`` for ``factory: auto`` and a catalogue of ``n`` items.

    Exact ``Flat`` below ``flat_below`` (exact search costs no more there than a graph searched at the
    target recall: measured, see ``configs/index/auto.yaml``); above it FAISS's guidelines
    ("Guidelines to choose an index" in the FAISS wiki): ``HNSW32,Flat`` while the graph's memory and
    build time are affordable, then inverted lists with ``4 * sqrt(N)`` lists trained on a sample,
    ``IVF{nlist},Flat``, from ``ivf_from`` (a file whose vectors ``IO_FLAG_MMAP`` can map).
    """
    if flat_below is None or ivf_from is None:
        raise ValueError("factory: auto needs flat_below and ivf_from (see configs/index/auto.yaml)")
    if n < flat_below:
        return "Flat", (
            f"auto: {n:,} items < flat_below {flat_below:,}: exact search is as fast as a graph index "
            "at the target recall for a catalogue this size"
        )
    if n < ivf_from:
        return "HNSW32,Flat", (
            f"auto: {flat_below:,} <= {n:,} items < ivf_from {ivf_from:,}: a graph index (FAISS guidelines: "
            "HNSW when memory allows; no training)"
        )
    return "IVF{nlist},Flat", (
        f"auto: {n:,} items >= ivf_from {ivf_from:,}: inverted lists, 4 * sqrt(N) lists trained on a "
        "sample (FAISS guidelines for 1M-10M vectors; an HNSW build this size is too slow on few cores)"
    )


_OFF = ("false", "no", "off", "0", "cpu", "none")
_ON = ("auto", "true", "yes", "on", "1", "gpu")


def gpu_off(requested: bool | str | None) -> bool:
    """True when a ``gpu`` setting (a bool, or a string such as ``false``/``off``/``cpu``) asks for no GPU."""
    return str(requested).strip().lower() in _OFF


def select_faiss_device(requested: bool | str, num_gpus: int, factory: str) -> tuple[str, str]:
    """Where to build and search an index: ``("cpu" | "gpu", reason)``.

    Args:
        requested: the config's ``gpu``: ``auto``, ``true`` or ``false`` (bools or strings).
        num_gpus: ``faiss.get_num_gpus()``; 0 with the faiss-cpu package.
        factory: the factory string, to spot index types FAISS has no GPU version of.
    """
    if gpu_off(requested):
        return "cpu", "CPU requested (gpu: false)"
    if str(requested).strip().lower() not in _ON:
        raise ValueError(f"gpu must be auto, true or false, got {requested!r}")
    if num_gpus <= 0:
        return "cpu", "no GPU visible to FAISS (faiss-cpu build or no device); building on CPU"
    unsupported = [key for key in NO_GPU if key in factory]
    if unsupported:
        return "cpu", f"{unsupported[0]} has no GPU implementation in FAISS; building {factory!r} on CPU"
    return "gpu", f"{num_gpus} GPU(s) visible to FAISS; building and searching on GPU 0"


def mmap_flags(factory: str) -> int:
    """``faiss.read_index`` flags that map an index file's vectors instead of copying them, or 0.

    Inverted lists map with ``IO_FLAG_MMAP``; flat code storage (``Flat``, an HNSW graph's vectors)
    with ``IO_FLAG_MMAP_IFC``. Mapped pages live in the page cache, so processes that map one file
    (``towerrec-serve --workers N``) share one copy of the vectors.
    """
    if "IVF" in factory:
        return faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    if hasattr(faiss, "IO_FLAG_MMAP_IFC") and ("Flat" in factory or "HNSW" in factory):
        return faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    return 0


def read_index(path: str | Path, flags: int = 0) -> faiss.Index:
    """``faiss.read_index(path, flags)``, with a mapped IVF index's prefetch threads turned off.

    Inverted lists read with ``IO_FLAG_MMAP`` become ``OnDiskInvertedLists``, whose every search
    starts up to ``prefetch_nthread`` (32) threads to touch the probed lists' pages and joins them at
    the next search. In a server that was about 4 thread creations per request (8 MB stacks mapped,
    ``madvise``d and unmapped each time, 10 to 13 page faults a request) and threads that outlive
    their request beside the next one; a similar-items search in process took 0.4 ms with them and
    0.16 ms without (1M items, nprobe 8). Without them the searching thread reads the mapped pages
    itself, from the page cache.
    """
    index = faiss.read_index(str(path), flags)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        if isinstance(lists, faiss.OnDiskInvertedLists):
            lists.prefetch_nthread = 0
    return index


def set_params(index: faiss.Index, params: dict[str, float]) -> None:
    """Set FAISS parameters by name through ``ParameterSpace`` (it sees through IDMap and refine wrappers;
    ``GpuParameterSpace`` in a GPU build, which also knows GPU indexes)."""
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as err:
            raise ValueError(f"FAISS parameter {name}={value} does not apply to this index") from err


def squared_norms(x: np.ndarray) -> np.ndarray:
    """``(N,)`` squared L2 norms of the rows of a C-contiguous float32 ``(N, D)`` array, by FAISS's
    own vectorised, multi-threaded kernel (numpy's ``einsum`` took 2 s at 10M x 64, more than the
    flat index's whole build)."""
    out = np.empty(len(x), dtype=np.float32)
    if len(x):
        faiss.fvec_norms_L2sqr(faiss.swig_ptr(out), faiss.swig_ptr(x), x.shape[1], len(x))
    return out


def normalized(vectors: np.ndarray) -> np.ndarray:
    """A float32, C-contiguous, L2-normalised copy of ``vectors`` (rows of zeros stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def training_sample(vectors: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Up to ``size`` rows of ``vectors``, drawn without replacement."""
    if not size or size >= len(vectors):
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return vectors[rows]


@dataclass
class BuiltIndex:
    """A built index (on CPU, ready to save) and how it was made."""

    index: faiss.Index
    spec: IndexSpec
    factory: str
    device: str
    device_reason: str
    train_seconds: float
    add_seconds: float

    @property
    def build_seconds(self) -> float:
        return self.train_seconds + self.add_seconds


def build_index(
    spec: IndexSpec,
    vectors: np.ndarray,
    ids: np.ndarray,
    num_gpus: int | None = None,
    keep_on_device: bool = False,
) -> BuiltIndex:
    """Build ``spec`` over unit-norm ``vectors`` whose ids are ``ids``.

    Args:
        spec: the index config; ``auto`` sizes are resolved here.
        vectors: ``(N, D)`` float32 unit-norm rows.
        ids: ``(N,)`` int64 ids returned by searches (the item indices).
        num_gpus: GPUs visible to FAISS; ``faiss.get_num_gpus()`` when None.
        keep_on_device: return the GPU index instead of its CPU copy (for searching right away).
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(ids):
        raise ValueError(f"vectors (N, D) and ids (N,) must match, got {x.shape} and {ids.shape}")
    spec = spec.resolve(len(x), x.shape[1])
    factory = spec.factory_string()
    gpus = faiss.get_num_gpus() if num_gpus is None else num_gpus
    device, reason = select_faiss_device(spec.gpu, gpus, factory)
    index = faiss.index_factory(x.shape[1], factory, METRIC)
    flat = _stores_flat(index)
    # The unit-norm check reads every vector once, on a second thread (FAISS releases the GIL). A
    # flat index's whole build is one copy of the vectors, as long as the check (10M x 64: 1.5 s build,
    # 1.7 s with the check before it), so there the two overlap and the check is awaited after the
    # add; any other index waits for it before its (much longer) training and add.
    with ThreadPoolExecutor(1, thread_name_prefix="unit-norm") as pool:
        norm_error = pool.submit(_unit_norm_error, x)
        if not flat:
            _check_unit_norm(norm_error.result())
        set_params(index, spec.build_params)
        if device == "gpu":
            try:
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            except (AttributeError, RuntimeError) as err:  # a factory part the GPU cloner does not know
                device, reason = "cpu", f"GPU copy of {factory!r} failed ({err}); building on CPU"
        log.info("index %s (%s): %s", spec.name, factory, reason)

        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(training_sample(x, spec.train_sample, spec.seed))
        t1 = time.perf_counter()
        # In chunks where an add makes temporaries (IVF assignments, graph links): bounded at 10M
        # items. A flat index stores the vectors as they come, and each add re-allocates and copies
        # its whole array: chunks there cost N^2 / chunk copying (10M x 64: 3.3 s instead of 1.5 s).
        chunk = len(x) if flat else spec.add_chunk
        for start in range(0, len(x), max(chunk, 1)):
            index.add_with_ids(x[start : start + chunk], ids[start : start + chunk])
        _check_unit_norm(norm_error.result())
        t2 = time.perf_counter()
    set_params(index, spec.search_params)
    if device == "gpu" and not keep_on_device:
        index = faiss.index_gpu_to_cpu(index)
        set_params(index, spec.search_params)
    return BuiltIndex(index, spec, factory, device, reason, t1 - t0, t2 - t1)


def _unit_norm_error(x: np.ndarray) -> float:
    """The largest distance of a row's squared norm from 1."""
    return float(np.abs(squared_norms(x) - 1.0).max()) if len(x) else 0.0


def _check_unit_norm(error: float) -> None:
    if error > 2e-3:
        raise ValueError(
            "vectors must be L2-normalised for the inner-product metric (see retrieval.normalized)"
        )


def _stores_flat(index: faiss.Index) -> bool:
    """Whether ``index`` (under an id map) keeps its vectors in one flat array (``IndexFlat``)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap2 | faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    return isinstance(inner, faiss.IndexFlat)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(B, k)``, best first; missing results have id -1."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    return index.search(q, k)


def exact_search(database: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product (``faiss.contrib.exhaustive_search.knn``), ``(B, k)``."""
    from faiss.contrib.exhaustive_search import knn

    _, rows = knn(np.ascontiguousarray(queries, dtype=np.float32), database, k, metric=METRIC)
    return ids[rows]


def ann_recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Recall@k of ANN ids against the exact top-k ids, with the project's metrics (ids must be >= 1)."""
    per_query = rank_metrics(torch.from_numpy(found[:, :k]), torch.from_numpy(exact[:, :k]), [k])
    return aggregate({"recall": per_query[f"recall@{k}"]})["recall"]


def measure_recall(
    index: faiss.Index, database: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = 10
) -> float:
    """Recall@k of ``index`` against exact search over ``database`` for ``queries``."""
    k = min(k, len(database))
    _, found = search(index, queries, k)
    return ann_recall(found, exact_search(database, ids, queries, k), k)
