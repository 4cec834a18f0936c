"""Retrieval: export item embeddings to FAISS, load and verify the export, query it.

``towerrec-export`` writes an export folder (:mod:`towerrec.retrieval.writer`); :func:`load_export`
reads it back after checking it against its manifest (:mod:`towerrec.retrieval.folder`);
:class:`ItemIndex` answers item -> items queries and, through :class:`Recommender`, history -> items.

Importing this package, loading an export and querying it item to item load neither Lightning nor
the model code: :func:`export_index` and :class:`Recommender` (which need the trained model) are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from towerrec.retrieval.folder import ExportError
from towerrec.retrieval.hits import Hit, UnknownItemError
from towerrec.retrieval.index import IndexSpec, build_index, select_faiss_device
from towerrec.retrieval.load import ItemIndex, load_export

if TYPE_CHECKING:
    from towerrec.retrieval.recommend import Recommender
    from towerrec.retrieval.writer import export_index

_DEFERRED = {"export_index": "towerrec.retrieval.writer", "Recommender": "towerrec.retrieval.recommend"}


def __getattr__(name: str):
    if name in _DEFERRED:
        return getattr(importlib.import_module(_DEFERRED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExportError",
    "Hit",
    "IndexSpec",
    "ItemIndex",
    "Recommender",
    "UnknownItemError",
    "build_index",
    "export_index",
    "load_export",
    "select_faiss_device",
]
