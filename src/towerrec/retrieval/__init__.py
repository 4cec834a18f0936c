"""Retrieval: export item embeddings to FAISS, load and verify the export, query it.

``towerrec-export`` writes an export folder (:func:`towerrec.retrieval.writer.export_index`);
:func:`load_export` reads it back after checking it against its manifest
(:mod:`towerrec.retrieval.folder`); :class:`ItemIndex` answers item -> items queries, and
``Recommender(index)`` (:mod:`towerrec.retrieval.recommend`) answers history -> items.

The one rule that keeps the training stack out of item-to-item queries: only ``writer`` and
``recommend`` import the model code, and this package and the modules an item query uses never import
them; a caller that needs them imports them by their module path. ``tests/test_layers.py`` checks it
on the import graph, ``tests/retrieval/test_boundaries.py`` in a fresh process.
"""

from __future__ import annotations

from towerrec.retrieval.folder import ExportError
from towerrec.retrieval.hits import Hit, UnknownItemError
from towerrec.retrieval.index import IndexSpec, build_index, select_faiss_device
from towerrec.retrieval.load import ItemIndex, load_export

__all__ = [
    "ExportError",
    "Hit",
    "IndexSpec",
    "ItemIndex",
    "UnknownItemError",
    "build_index",
    "load_export",
    "select_faiss_device",
]
