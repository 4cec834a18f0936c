"""Content features: categorical fields and text (hashed tokens, optionally sentence features)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from towerrec.models.components.dropout import Dropout


class ContentEncoder(nn.Module):
    """Embeds categorical fields and hashed text tokens, projects them to ``out_dim``.

    Args:
        cardinalities: vocabulary size of each categorical field (code 0 = unknown).
        text_buckets: hashed-token vocabulary size (0 = padding); 0 disables text.
        out_dim: output size.
        field_dim: embedding size per field and for the text bag.
        sentence_dim: size of precomputed sentence-model features; 0 disables them.
        dropout: dropout before the projection.
        init_std: standard deviation of the initial field and token embeddings (1.0 is PyTorch's).
    """

    def __init__(
        self,
        cardinalities: list[int],
        text_buckets: int,
        out_dim: int,
        field_dim: int = 16,
        sentence_dim: int = 0,
        dropout: float = 0.1,
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.fields = nn.ModuleList(nn.Embedding(c, field_dim, padding_idx=0) for c in cardinalities)
        self.text = nn.EmbeddingBag(text_buckets, field_dim, mode="mean", padding_idx=0) if text_buckets > 1 else None
        in_dim = field_dim * (len(self.fields) + (self.text is not None)) + sentence_dim
        if in_dim == 0:
            raise ValueError("ContentEncoder: the data has no categorical, text or sentence features")
        self.sentence_dim = sentence_dim
        self.proj = nn.Sequential(Dropout(dropout), nn.Linear(in_dim, out_dim))
        self.out_dim = out_dim
        # A category value or token seen only on never-bought items is never trained: a small init
        # (e.g. 0.01) keeps it from adding N(0, 1) noise to a cold item's embedding.
        for emb in [*self.fields, *([self.text] if self.text is not None else [])]:
            nn.init.normal_(emb.weight, std=init_std)
            with torch.no_grad():
                emb.weight[0].zero_()

    def forward(self, categorical: Tensor, text: Tensor, sentence: Tensor | None = None) -> Tensor:
        parts = [emb(categorical[:, j]) for j, emb in enumerate(self.fields)]  # F x (B, field_dim)
        if self.text is not None:
            parts.append(self.text(text))  # (B, field_dim); all-padding rows give zeros
        if self.sentence_dim:
            parts.append(sentence)
        return self.proj(torch.cat(parts, dim=-1))
