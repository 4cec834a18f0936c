"""Operating points: the cheapest search setting of a built index that reaches a target recall.

The candidate settings are FAISS's own (``faiss.ParameterSpace.initialize``: ``efSearch`` for HNSW,
``nprobe`` for IVF, ``k_factor_rf`` for a refine stage, ``quantizer_efSearch`` for an HNSW coarse
quantizer), extended upwards by doubling where FAISS's list stops short of what a hard catalog needs.
They are explored with ``faiss.contrib.evaluation.OperatingPointsWithRanges``, which assumes that a
larger value of every parameter is slower and more accurate, so a setting is skipped when a measured
one proves it cannot reach the target, or cannot be cheaper than the best setting found so far.

Recall is measured per query set (user-history queries and item queries) against its own exact
reference, with ``faiss.contrib.evaluation.knn_intersection_measure``; a setting reaches the target
when every set does. Cost is measured as a server searches: one query at a time on one thread
(``towerrec-serve --threads 1``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import faiss
import numpy as np
from faiss.contrib.evaluation import OperatingPointsWithRanges, knn_intersection_measure

from towerrec.retrieval.index import BuiltIndex, build_index

log = logging.getLogger(__name__)

#: How far each search parameter may be raised beyond FAISS's own candidate list (doubling).
PARAMETER_CAPS = {"efSearch": 4096, "quantizer_efSearch": 1024, "k_factor_rf": 64, "k_factor": 64}
#: Parameters FAISS lists that are not speed/recall knobs for these indexes (polysemous Hamming threshold).
IGNORED_PARAMETERS = ("ht",)


class TargetRecallError(ValueError):
    """No search setting of the index reaches the target recall."""


@dataclass
class OperatingPoint:
    """One measured search setting.

    Args:
        params: FAISS parameter values (``{}`` for an index without search parameters, such as Flat).
        recall: recall@k per query set (``user``, ``item``).
        seconds: single-threaded time of the timed queries, searched one at a time.
        queries: queries timed (all sets).
    """

    params: dict[str, float]
    recall: dict[str, float]
    seconds: float
    queries: int

    @property
    def worst_recall(self) -> float:
        return min(self.recall.values())

    @property
    def queries_per_s(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else float("inf")

    @property
    def ms_per_query(self) -> float:
        return 1000 * self.seconds / max(1, self.queries)


@dataclass
class Tuned:
    """The chosen operating point and what was explored to find it."""

    chosen: OperatingPoint
    target: float
    k: int
    explored: list[OperatingPoint] = field(default_factory=list)
    candidates: int = 1

    def to_manifest(self) -> dict:
        """The manifest's ``operating_point`` entry."""
        return {
            "target_recall": self.target,
            "k": self.k,
            "params": self.chosen.params,
            "recall": {name: round(r, 4) for name, r in self.chosen.recall.items()},
            "queries_per_s": round(self.chosen.queries_per_s, 1),
            "ms_per_query": round(self.chosen.ms_per_query, 4),
            "threads": 1,
            "candidates": self.candidates,
            "explored": [
                {**asdict(p), "recall": {n: round(r, 4) for n, r in p.recall.items()}, "seconds": round(p.seconds, 4)}
                for p in sorted(self.explored, key=lambda p: p.seconds)
            ],
        }


def _inner(index: faiss.Index) -> faiss.Index:
    """The index under an ``IDMap``/``IDMap2`` wrapper (``ParameterSpace`` does not look through it)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


def _nlist(index: faiss.Index) -> int | None:
    for part in (index, getattr(index, "base_index", None)):
        if part is None:
            continue
        try:
            return int(faiss.extract_index_ivf(part).nlist)
        except RuntimeError:
            continue
    return None


def parameter_ranges(index: faiss.Index) -> list[tuple[str, list[float]]]:
    """``[(name, values ascending)]``: FAISS's search parameters of ``index`` and their candidate values.

    FAISS's list (``ParameterSpace.initialize``) is kept and extended by doubling up to
    :data:`PARAMETER_CAPS` (``nprobe`` up to the number of lists, where the search is exhaustive).
    """
    inner = _inner(index)
    space = faiss.ParameterSpace()
    space.initialize(inner)
    nlist = _nlist(inner)
    ranges = []
    for i in range(space.parameter_ranges.size()):
        pr = space.parameter_ranges.at(i)
        name = pr.name
        if name in IGNORED_PARAMETERS:
            continue
        values = sorted({float(pr.values.at(j)) for j in range(pr.values.size())})
        cap = nlist if name == "nprobe" and nlist else PARAMETER_CAPS.get(name)
        if cap is not None:
            values = [v for v in values if 0 < v <= cap]
            while values and values[-1] * 2 <= cap:
                values.append(values[-1] * 2)
            if name == "nprobe" and values and values[-1] < cap:
                values.append(float(cap))
        ranges.append((name, values))
    return [(name, values) for name, values in ranges if values]


def set_search_params(index: faiss.Index, params: dict[str, float]) -> None:
    """Set search parameters by name on ``index`` (through an IDMap wrapper)."""
    space = faiss.ParameterSpace()
    inner = _inner(index)
    for name, value in params.items():
        space.set_index_parameter(inner, name, float(value))


def measure(
    index: faiss.Index,
    query_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int,
    params: dict[str, float],
    timed: int = 200,
) -> OperatingPoint:
    """Recall@k of each query set against its exact ids at ``params``, and the search cost.

    The cost is that of serving: up to ``timed`` queries of each set searched one at a time on one
    thread (a batch would let exact search use a matrix product that a single request never gets).
    """
    set_search_params(index, params)
    recall = {}
    for name, (queries, exact) in query_sets.items():
        _, found = index.search(queries, k)
        recall[name] = float(knn_intersection_measure(found[:, :k], exact[:, :k]))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        seconds, n = 0.0, 0
        for queries, _ in query_sets.values():
            sample = queries[:timed]
            t = time.perf_counter()
            for i in range(len(sample)):
                index.search(sample[i : i + 1], k)
            seconds += time.perf_counter() - t
            n += len(sample)
    finally:
        faiss.omp_set_num_threads(threads)
    return OperatingPoint({p: float(v) for p, v in params.items()}, recall, seconds, n)


def tune(
    index: faiss.Index,
    query_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int,
    target: float,
    what: str = "index",
) -> Tuned:
    """The cheapest search setting of ``index`` whose recall@k reaches ``target`` on every query set.

    The index is left set to the chosen setting.

    Args:
        index: a built index (searches return the ids the references use).
        query_sets: ``{name: (queries (Q, D) float32, exact ids (Q, k))}``.
        k: the recall cut-off.
        target: the recall@k every set must reach, in (0, 1].
        what: names the index in the error message.

    Raises:
        TargetRecallError: (one line) when no setting reaches ``target``: it names the best recall
            reached and what to do.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target}")
    query_sets = {
        name: (np.ascontiguousarray(q, dtype=np.float32), np.asarray(ids)) for name, (q, ids) in query_sets.items() if len(q)
    }
    ranges = parameter_ranges(index)
    ops = OperatingPointsWithRanges()
    for name, values in ranges:
        ops.add_range(name, values)
    total = ops.num_experiments()
    explored: list[OperatingPoint] = []
    best: OperatingPoint | None = None
    # Cheapest first (FAISS's sample_experiments starts with the dearest setting, which at 1M items
    # costs more than the whole search that follows): the first setting to reach the target then
    # rules out every setting above it.
    keys = sorted((ops.cno_to_key(cno) for cno in range(total)), key=lambda key: (int(key.sum()), *key[::-1]))
    for key in keys:
        max_perf, min_time = ops.predict_bounds(key)
        # Monotone parameters: a setting below one that missed the target misses it too, and a
        # setting above one that reached it costs at least as much.
        if max_perf < target or (best is not None and min_time >= best.seconds):
            continue
        params = {name: float(v) for name, v in ops.get_parameters(key).items()}
        point = measure(index, query_sets, k, params)
        explored.append(point)
        ops.add_operating_point(key, point.worst_recall, point.seconds)
        log.debug("%s %s: recall %s, %.4fs", what, params, point.recall, point.seconds)
        if point.worst_recall >= target and (best is None or point.seconds < best.seconds):
            best = point
    if best is None:
        top = max(explored, key=lambda p: p.worst_recall)
        set_search_params(index, top.params)
        reached = ", ".join(f"{name} {r:.3f}" for name, r in top.recall.items())
        setting = _setting(top.params)
        raise TargetRecallError(
            f"{what}: no search setting reaches recall@{k} {target:g} (best: {reached} at {setting}); "
            "use a larger index (more HNSW links or IVF lists, a finer code) or index=flat, "
            "or lower index.target_recall"
        )
    set_search_params(index, best.params)
    return Tuned(best, target, k, explored, total)


def tune_built(
    built: BuiltIndex,
    vectors: np.ndarray,
    ids: np.ndarray,
    query_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int,
    target: float,
    what: str,
) -> tuple[BuiltIndex, Tuned]:
    """Tune a built index to ``target``; for ``factory: auto`` below ``ivf_from``, keep exact search
    instead when it costs no more per query than the graph at its operating point (or the graph
    cannot reach the target at all): user queries can need a far larger ``efSearch`` than items.

    Returns:
        The index to save (``built`` or an exact ``Flat`` over the same vectors) and its operating point.
    """
    spec = built.spec
    compare = spec.reason is not None and spec.factory != "Flat" and spec.ivf_from and len(vectors) < spec.ivf_from
    if not compare:
        return built, tune(built.index, query_sets, k, target, what)
    try:
        graph: Tuned | None = tune(built.index, query_sets, k, target, what)
    except TargetRecallError as err:
        graph, missed = None, str(err)
    exact_built = build_index(replace(spec, factory="Flat", reason=None), vectors, ids)
    exact = tune(exact_built.index, query_sets, k, target, what)
    if graph is not None and graph.chosen.ms_per_query < exact.chosen.ms_per_query:
        graph.explored.extend(exact.explored)  # the manifest shows what exact search would have cost
        return built, graph
    why = (
        f"{missed}" if graph is None
        else f"{spec.factory} needs {_setting(graph.chosen.params)} for recall@{k} {target:g} at "
        f"{graph.chosen.ms_per_query:.3f} ms/query; exact search costs {exact.chosen.ms_per_query:.3f} ms/query"
    )  # fmt: skip
    reason = f"auto: measured at export, {why} -> {exact_built.factory}"
    exact.explored = [*(graph.explored if graph else []), *exact.explored]
    return replace(exact_built, spec=replace(exact_built.spec, reason=reason)), exact


def _setting(params: dict[str, float]) -> str:
    return ", ".join(f"{p}={v:g}" for p, v in params.items()) or "exact search"
