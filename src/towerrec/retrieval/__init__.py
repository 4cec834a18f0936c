"""Retrieval: export item embeddings to FAISS, load and verify the export, query it.

``towerrec-export`` writes an export folder (:mod:`towerrec.retrieval.export`); :func:`load_export`
reads it back after checking it against its manifest; :class:`ItemIndex` answers item -> items and
history -> items queries.
"""

from towerrec.retrieval.export import ExportError, export_index
from towerrec.retrieval.index import IndexSpec, build_index, select_faiss_device
from towerrec.retrieval.load import Hit, ItemIndex, UnknownItemError, load_export
from towerrec.retrieval.recommend import Recommender

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
