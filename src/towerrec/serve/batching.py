"""Micro-batching: the queries that arrive while a search runs are answered together by the next one.

A request hands its query to a :class:`MicroBatcher` and awaits the answer. One batch at a time runs
on the thread pool (a FAISS search releases the GIL, so the event loop keeps reading requests
meanwhile); the queries that arrived in the meantime form the next batch. One thread hop and one index
call per batch instead of per request: under load the batch grows by itself, and a lone request is
answered at once (no waiting for a batch to fill).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

Q = TypeVar("Q")
R = TypeVar("R")


class MicroBatcher(Generic[Q, R]):
    """Answers queries in batches with ``answer_many`` (a blocking call, run on the thread pool).

    Args:
        answer_many: queries -> one answer per query, in order.
        max_batch: the most queries in one call.
    """

    def __init__(self, answer_many: Callable[[list[Q]], list[R]], max_batch: int = 64) -> None:
        self.answer_many = answer_many
        self.max_batch = max_batch
        self._pending: list[tuple[Q, asyncio.Future]] = []
        self._running = False
        self.batches = 0
        self.queries = 0

    async def answer(self, query: Q) -> R:
        """The answer to ``query`` (or the exception ``answer_many`` raised for its batch)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((query, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    answers = await run_in_threadpool(self.answer_many, [q for q, _ in batch])
                except Exception as err:  # every query of the batch gets the error (its request answers 500)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                self.batches += 1
                self.queries += len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():  # a request whose client went away
                        future.set_result(answer)
        finally:
            self._running = False
