"""The export a server answers from, and its hot reload: verify the new folder fully, then swap one
reference. A request takes the reference once and finishes on that export, whatever a reload does
meanwhile."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss

from towerrec.retrieval import ExportError, ItemIndex, load_export, select_faiss_device
from towerrec.retrieval.hits import Hit
from towerrec.serve.batching import MicroBatcher

if TYPE_CHECKING:
    from towerrec.retrieval.customers import Audiences
    from towerrec.retrieval.recommend import Recommender

log = logging.getLogger(__name__)
_this_thread = threading.local()


def set_threads(threads: int) -> None:
    """Intra-op threads of FAISS (OpenMP) and, once it is loaded, of torch (the user tower).

    Requests already run in parallel on the server's thread pool, so a single query gains little
    from more threads and many threads per query oversubscribe the cores.
    """
    faiss.omp_set_num_threads(threads)
    torch = sys.modules.get("torch")  # item-to-item serving never needs torch itself
    if torch is not None:
        torch.set_num_threads(threads)


def threads_here(threads: int) -> None:
    """Set FAISS's and torch's thread counts in the calling thread, once per thread.

    OpenMP keeps the count per thread, and FAISS and torch each bring their own OpenMP runtime:
    setting them in the main thread leaves the server's pool threads at one OpenMP thread per core.
    Each single-query search then started a team that spun on cores the other requests needed
    (measured: about 9x the CPU per FAISS search), and each user-tower pass of a recommend batch a
    team of torch's.
    """
    if getattr(_this_thread, "threads", None) != threads:
        set_threads(threads)  # both calls set the calling thread's own count
        if "torch" in sys.modules:
            _this_thread.threads = threads  # only once torch is loaded can both be set


@dataclass
class Served:
    """One loaded, verified export and what the server keeps about it."""

    index: ItemIndex
    device: str
    loaded_at: float = field(default_factory=time.time)
    # FAISS GPU indexes are not safe to search from several threads at once; CPU indexes are.
    search_lock: threading.Lock | None = None
    threads: int = 1
    _user_lock: threading.Lock = field(default_factory=threading.Lock)
    _recommender: Recommender | None = None
    _audiences: Audiences | None = None
    _audience_lock: threading.Lock = field(default_factory=threading.Lock)
    # Single queries of this export, answered in batches (one per export: a request taken before a
    # reload is answered from the export it took).
    similar: MicroBatcher = field(init=False)
    recommend: MicroBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.similar = MicroBatcher(self._similar_many)
        self.recommend = MicroBatcher(self._recommend_many)

    def _similar_many(self, queries: list[tuple]) -> list[list[Hit]]:
        with self.searching():
            return self.index.similar_items_many(queries)

    def _recommend_many(self, queries: list[tuple]) -> list[list[Hit]]:
        recommender = self.recommender()
        with self.searching():
            return recommender.recommend_many(queries)

    def searching(self) -> contextlib.AbstractContextManager:
        """Hold this around a search: the GPU lock where there is one, else nothing (and ``threads``
        FAISS and torch threads in the calling thread)."""
        threads_here(self.threads)
        return self.search_lock if self.search_lock is not None else contextlib.nullcontext()

    def audiences(self) -> Audiences:
        """The export's customers, loaded (and verified) at the first audience request.

        Raises:
            ExportError: the export holds no customer data, or its customer files changed.
        """
        if self._audiences is None:
            with self._audience_lock:
                if self._audiences is None:
                    from towerrec.retrieval.customers import load_audiences

                    self._audiences = load_audiences(self.index)
        return self._audiences

    @property
    def sha256(self) -> str:
        return str(self.index.manifest.get("manifest_sha256"))

    @property
    def user_model_loaded(self) -> bool:
        return self._recommender is not None

    def recommender(self) -> Recommender:
        """The export's :class:`~towerrec.retrieval.recommend.Recommender`, built at the first history query.

        ``recommend`` imports torch and the model code; it is imported here, where it is first needed,
        so that a server answering item-to-item queries never loads the training stack.

        Raises:
            ExportError: the export's checkpoint is missing or changed since export.
        """
        if self._recommender is None:
            with self._user_lock:
                if self._recommender is None:
                    from towerrec.retrieval.recommend import Recommender

                    recommender = Recommender(self.index)
                    set_threads(self.threads)
                    self._recommender = recommender
        return self._recommender


class ExportHolder:
    """The served export: loaded at start, replaced atomically by :meth:`reload`.

    Args:
        path: the export folder; a reload reads the same folder again (``towerrec-export
            overwrite=true`` replaces it atomically), never a path taken from a request.
        gpu: ``auto`` | ``true`` | ``false``, as ``load_export`` takes it.
        threads: intra-op threads for FAISS and torch.
        index: an already verified export of ``path`` (the CLI verifies before it starts uvicorn).
    """

    def __init__(
        self, path: str | Path, gpu: str = "false", threads: int = 1, index: ItemIndex | None = None
    ):
        self.path = Path(path)
        self.gpu = gpu
        self.threads = threads
        self._reload_lock = threading.Lock()
        self.reloads = 0
        self.last_reload_error: str | None = None
        set_threads(threads)
        self._current = self._wrap(index if index is not None else self._load())

    def _load(self) -> ItemIndex:
        return load_export(self.path, verify=True, gpu=self.gpu)

    def _wrap(self, index: ItemIndex) -> Served:
        device, _ = select_faiss_device(self.gpu, faiss.get_num_gpus(), index.manifest["factory"])
        lock = threading.Lock() if device == "gpu" else None
        return Served(index, device, search_lock=lock, threads=self.threads)

    @property
    def current(self) -> Served:
        """The export to answer one request from (take it once per request)."""
        return self._current

    def reload(self) -> dict:
        """Verify the export folder again and swap it in; on any failure keep serving the old one.

        Returns:
            ``{"reloaded": bool, "serving": sha256, "previous": sha256, "items": n, "seconds": s}``,
            with ``"error"`` (one line) when the new folder was refused.
        """
        with self._reload_lock:  # one reload at a time; requests never wait on it
            old = self._current
            t0 = time.perf_counter()
            try:
                new = self._wrap(self._load())
                if old.user_model_loaded:  # warm what was warm, before any request can see it
                    new.recommender()
            except (ExportError, ValueError, OSError) as err:
                self.last_reload_error = str(err)
                log.warning("reload refused, still serving %s: %s", old.sha256, err)
                return {
                    "reloaded": False,
                    "error": f"reload refused: {err}",
                    "serving": old.sha256,
                    "items": len(old.index),
                }
            self._current = new  # the atomic swap: one reference assignment
            self.reloads += 1
            self.last_reload_error = None
            seconds = round(time.perf_counter() - t0, 3)
            log.info("reloaded %s in %.2fs: %s -> %s", self.path, seconds, old.sha256, new.sha256)
            return {
                "reloaded": True,
                "serving": new.sha256,
                "previous": old.sha256,
                "items": len(new.index),
                "seconds": seconds,
            }
