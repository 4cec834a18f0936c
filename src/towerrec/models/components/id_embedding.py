"""Item-ID embedding with ID dropout (DropoutNet-style) for cold-start robustness."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class IdEmbedding(nn.Module):
    """An embedding per item id, replaced by a learned "unknown" vector when the id is not usable.

    During training each id is dropped with probability ``dropout_p``, so the rest of the item
    tower learns to stand on its own. Items with no training interaction (``warm`` False) never
    use their id: their row was never trained.

    Args:
        num_items: catalog size (ids 1..num_items; 0 is padding).
        dim: output size.
        dropout_p: probability of replacing a warm item's id embedding while training.
        min_count: training interactions an item needs to use its id at all. Below it the id row
            would be fitted to one or two purchases; such items go through image and content, like
            cold items, which also gives that path many more training examples.
        init_std: standard deviation of the rows' normal initialisation. A row moves only when its item
            is in a batch, so the init of a rarely bought item is most of what the fusion sees of it:
            large values there are noise that the rest of the tower has to outweigh.
    """

    def __init__(self, num_items: int, dim: int, dropout_p: float = 0.3, min_count: int = 1, init_std: float = 1.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.unknown = nn.Parameter(torch.zeros(dim))
        self.dropout_p = dropout_p
        self.min_count = min_count
        self.out_dim = dim
        nn.init.normal_(self.embedding.weight, std=init_std)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, idx: Tensor, warm: Tensor, drop: bool = True) -> Tensor:
        """``drop=False`` keeps every usable id even while training."""
        use_id = warm
        if self.training and drop and self.dropout_p > 0:
            use_id = use_id & (torch.rand(idx.shape, device=idx.device) >= self.dropout_p)
        emb = self.embedding(idx)  # (..., D)
        return torch.where(use_id.unsqueeze(-1), emb, self.unknown.expand_as(emb))
