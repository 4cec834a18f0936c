"""Micro-batching of single queries, the batch forms of the Python API, and FAISS and torch threads in pool threads."""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from pathlib import Path

import faiss
import torch

from towerrec.retrieval import load_export
from towerrec.retrieval.recommend import Recommender
from towerrec.serve.batching import MicroBatcher
from towerrec.serve.state import Served, threads_here


def test_concurrent_queries_are_answered_in_batches_in_order():
    sizes = []

    def answer_many(queries: list[int]) -> list[int]:
        sizes.append(len(queries))
        time.sleep(0.05)  # a search: the queries sent meanwhile wait for the next batch
        return [q * 10 for q in queries]

    async def run():
        batcher = MicroBatcher(answer_many, max_batch=8)
        answers = await asyncio.gather(*(batcher.answer(q) for q in range(20)))
        lone = await batcher.answer(99)  # alone: answered at once, in a batch of one
        return batcher, answers, lone

    batcher, answers, lone = asyncio.run(run())
    assert answers == [q * 10 for q in range(20)] and lone == 990
    # 20 queries sent together: batches of at most 8; a lone query is answered at once, in a batch of one.
    assert sizes == [8, 8, 4, 1]
    assert (batcher.batches, batcher.queries) == (len(sizes), 21)


def test_a_failed_batch_fails_each_of_its_queries_and_the_next_batch_runs():
    calls = []

    def answer_many(queries: list[str]) -> list[str]:
        calls.append(list(queries))
        if "bad" in queries:
            raise RuntimeError("index gone")
        return [q.upper() for q in queries]

    async def run():
        batcher = MicroBatcher(answer_many)
        failed = await asyncio.gather(batcher.answer("bad"), batcher.answer("x"), return_exceptions=True)
        return failed, await batcher.answer("ok")

    failed, ok = asyncio.run(run())
    assert calls[0] == ["bad", "x"] and all(isinstance(f, RuntimeError) for f in failed)
    assert calls[1] == ["ok"] and ok == "OK"


def test_many_forms_answer_as_one_query_at_a_time(exports):
    index = load_export(exports["ivf_flat"])
    ids = index.items["item_id"].tolist()
    queries = [(ids[0], 5, []), (ids[1], 3, [ids[2], ids[3]]), (ids[0], 7, [ids[4]])]
    assert index.similar_items_many(queries) == [index.similar_items(i, k, exclude=e) for i, k, e in queries]
    histories = [([ids[5], ids[6]], 4, [], True), ([ids[7]], 6, [ids[8]], False)]
    rec = Recommender(index)
    assert rec.recommend_many(histories) == [
        rec.recommend(h, k=k, exclude=e, exclude_history=x) for h, k, e, x in histories
    ]


def _counts_in_a_new_thread(read, before=None) -> tuple[int, int]:
    """A new thread's OpenMP count (``read()``) before and inside ``Served.searching()``."""
    served = Served(index=None, device="cpu", threads=1)  # searching() needs no export
    seen = []

    def run():
        if before is not None:
            before()
        seen.append(read())
        with served.searching():
            seen.append(read())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return seen[0], seen[1]


def test_served_searches_use_the_configured_faiss_threads_in_any_thread():
    # the thread's own count set to 2 first, as a pool thread may have it
    assert _counts_in_a_new_thread(faiss.omp_get_max_threads, lambda: faiss.omp_set_num_threads(2)) == (2, 1)
    threads_here(1)  # idempotent in this thread
    assert faiss.omp_get_max_threads() == 1


def _torch_openmp():
    """torch's own OpenMP runtime (the project's torch wheels ship ``libgomp`` in ``torch/lib``), to
    read a thread's count directly: ``torch.get_num_threads()`` answers the process-wide setting,
    not what a new thread will use."""
    libs = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    assert libs, f"no libgomp in {Path(torch.__file__).parent / 'lib'}: torch's OpenMP runtime not found"
    return ctypes.CDLL(str(libs[0]))


def test_served_searches_use_the_configured_torch_threads_in_any_thread():
    """The user tower runs in the server's pool threads; with torch at its per-thread default there
    (one OpenMP thread per core), every pass started a team (two workers on two cores spun on each other)."""
    omp = _torch_openmp()
    torch.set_num_threads(1)
    # the thread's own count set to 2 first, as a new thread has it on a 2-core machine
    assert _counts_in_a_new_thread(omp.omp_get_max_threads, lambda: omp.omp_set_num_threads(2)) == (2, 1)
