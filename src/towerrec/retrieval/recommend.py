"""History -> items: the exported checkpoint's user tower over the exported item embeddings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from towerrec.models.checkpoint import load_model
from towerrec.retrieval.folder import verified_checkpoint
from towerrec.retrieval.hits import Hit

if TYPE_CHECKING:
    from towerrec.retrieval.load import ItemIndex

log = logging.getLogger(__name__)


class Recommender:
    """User-to-item retrieval for an export: history -> user tower -> query -> index search.

    Args:
        index: the loaded export.
        ckpt_path: the checkpoint, when it moved since export (its sha256 must still match).
    """

    def __init__(self, index: ItemIndex, ckpt_path: str | Path | None = None) -> None:
        self.index = index
        ckpt = index.manifest["checkpoint"]
        # Only the weights: histories are embedded from the exported item vectors, so neither the
        # processed data nor the item features are needed.
        self.model = load_model(verified_checkpoint(ckpt_path or ckpt["path"], ckpt["sha256"]))
        self.max_history = int(index.manifest["model"]["max_history"])
        emb = torch.from_numpy(np.array(index.embeddings, dtype=np.float32))  # a copy: the export maps its file
        n_rows = int(index.items["item_idx"].max()) + 1
        # Item index -> embedding, row 0 (padding) zero, as the user tower saw in training.
        self.item_emb = torch.zeros(n_rows, emb.shape[1])
        self.item_emb[torch.tensor(index.items["item_idx"].to_numpy())] = emb

    @torch.no_grad()
    def user_vector(self, history: list[str]) -> np.ndarray:
        """The ``(D,)`` unit-norm query of a history (oldest first; the last ``max_history`` items count)."""
        idx = self.index.item_idx(list(history))[-self.max_history :]
        seq = torch.zeros(1, self.max_history, dtype=torch.long)  # left-padded
        if len(idx):
            seq[0, -len(idx) :] = torch.from_numpy(idx)
        return self.model.user_embeddings(seq, self.item_emb)[0].numpy()  # (D,)

    def recommend(
        self,
        history: list[str],
        k: int = 10,
        exclude: list[str] | tuple[str, ...] = (),
        exclude_history: bool = True,
    ) -> list[Hit]:
        """Top-k items for ``history``; each hit's ``because`` is the history item most similar to it.

        Args:
            history: raw item ids, oldest first.
            k: items to return.
            exclude: raw ids to leave out.
            exclude_history: leave out the history items too.
        """
        return self.recommend_many([(history, k, exclude, exclude_history)])[0]

    def recommend_many(
        self, queries: list[tuple[list[str], int, list[str] | tuple[str, ...], bool]]
    ) -> list[list[Hit]]:
        """:meth:`recommend` of each ``(history, k, exclude, exclude_history)``: one user-tower pass per
        history (a batched pass would change the scores' last bits with the batch), one index search."""
        for history, *_ in queries:
            if not history:
                raise ValueError("history is empty: give at least one item id")
        excluded = []
        for history, _, exclude, exclude_history in queries:
            left_out = [*exclude, *history] if exclude_history else list(exclude)
            excluded.append(set(self.index.item_idx(left_out).tolist()))
        vectors = np.stack([self.user_vector(history) for history, *_ in queries])  # (B, D)
        answers = self.index.search_vectors(vectors, [k for _, k, _, _ in queries], excluded)
        for (history, *_), hits in zip(queries, answers, strict=True):
            self._because(history, hits)
        return answers

    def _because(self, history: list[str], hits: list[Hit]) -> None:
        """Name on each hit the history item most similar to it."""
        if not hits:
            return
        hist_rows = self.index.rows(list(history))
        hist_emb = self.index.embeddings[hist_rows]  # (H, D)
        res_emb = self.item_emb[[h.item_idx for h in hits]].numpy()  # (k, D)
        sims = res_emb @ hist_emb.T  # (k, H)
        best = sims.argmax(axis=1)
        for hit, j, row in zip(hits, best, sims, strict=True):
            hit.because = str(history[j])
            hit.because_score = float(row[j])
