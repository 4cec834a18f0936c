"""History -> items: the exported checkpoint's user tower over the exported item embeddings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from towerrec.checkpoint import file_sha256
from towerrec.models.two_tower import TwoTowerModule
from towerrec.retrieval.export import ExportError
from towerrec.retrieval.load import Hit, ItemIndex

log = logging.getLogger(__name__)


def load_user_model(ckpt_path: str | Path, sha256: str | None = None) -> tuple[TwoTowerModule, int]:
    """The trained model of a checkpoint, in eval mode, and the history length it reads.

    Only the weights are read: queries embed histories with the exported item embeddings, so neither
    the processed data nor the item features are needed (unlike :func:`towerrec.checkpoint.load_trained`).

    Args:
        ckpt_path: the checkpoint named in the export manifest.
        sha256: its sha256 recorded at export; a different file is refused.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} named in the export manifest is missing (pass its new path)")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ExportError(f"checkpoint {path} changed since export (sha256 mismatch); re-run towerrec-export")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not ckpt.get("towerrec_config"):
        raise ExportError(f"{path}: no towerrec_config in this checkpoint (not written by towerrec-train?)")
    cfg = OmegaConf.create(ckpt["towerrec_config"])
    model: TwoTowerModule = instantiate(cfg.model)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, int(cfg.datamodule.max_history)


class Recommender:
    """User-to-item retrieval for an export: history -> user tower -> query -> index search.

    Args:
        index: the loaded export.
        ckpt_path: the checkpoint, when it moved since export (its sha256 must still match).
    """

    def __init__(self, index: ItemIndex, ckpt_path: str | Path | None = None) -> None:
        self.index = index
        ckpt = index.manifest["checkpoint"]
        self.model, self.max_history = load_user_model(ckpt_path or ckpt["path"], ckpt["sha256"])
        emb = torch.from_numpy(np.asarray(index.embeddings, dtype=np.float32))
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
        if not history:
            raise ValueError("history is empty: give at least one item id")
        left_out = [*exclude, *history] if exclude_history else list(exclude)
        excluded = set(self.index.item_idx(left_out).tolist())
        hits = self.index.search_vector(self.user_vector(history), k, excluded)
        if not hits:
            return hits
        hist_rows = self.index.rows(list(history))
        hist_emb = self.index.embeddings[hist_rows]  # (H, D)
        res_emb = self.item_emb[[h.item_idx for h in hits]].numpy()  # (k, D)
        sims = res_emb @ hist_emb.T  # (k, H)
        best = sims.argmax(axis=1)
        for hit, j, row in zip(hits, best, sims, strict=True):
            hit.because = str(history[j])
            hit.because_score = float(row[j])
        return hits
