"""User-tower sequence encoders over item-tower embeddings of the purchase history.

Each takes ``x (B, L, D)`` (left-padded; the most recent item last) and ``padding_mask (B, L)``
(True = padding) and returns ``(B, L, D)``: position ``t`` sees only positions ``<= t``, so all
positions train at once and the last position is the user's embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from towerrec.models.components.dropout import Dropout, dropout

# A large finite negative rather than -inf: a fully masked (padding) row then gives a uniform
# softmax instead of NaN, and it stays finite in half precision.
_NEG = -1e4


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a feed-forward layer."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.dropout_mask = "torch"  # of the attention weights (see towerrec.models.components.dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor, last_only: bool = False) -> Tensor:
        """``(B, L, D)`` -> ``(B, L, D)``; with ``last_only``, ``(B, 1, D)``: the last position's output,
        its query attending to every position's keys (the other positions' outputs are not computed)."""
        b, length, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if last_only:
            h, q, mask = h[:, -1:], q[:, :, -1:], mask[:, :, -1:]
            length = 1
        if self.training and self.dropout and self.dropout_mask != "torch" and h.device.type == "cpu":
            # SDPA's attention dropout draws torch's mask: the same attention written out, with the
            # other mask on the attention weights.
            w = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + mask, dim=-1)
            a = dropout(w, self.dropout, mask=self.dropout_mask) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(b, length, d)))  # (B, L, D)
        return h + self.drop(self.ff(self.norm2(h)))


class CausalTransformerEncoder(nn.Module):
    """SASRec-style causal transformer with learned positions.

    Padding is masked out of the attention and positions count back from the most recent item, so
    a history's output does not depend on how much padding precedes it (``trims_padding``).

    Args:
        dim: model width (the item embedding size).
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``dim``).
        max_len: longest sequence (number of learned positions); longer inputs keep their end.
        dropout: dropout in attention, feed-forward and on the inputs.
    """

    trims_padding = True
    last_only = True  # forward(..., last_only=True): only the last position's output

    def __init__(self, dim: int, num_layers: int = 2, num_heads: int = 2, max_len: int = 50, dropout: float = 0.2) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.max_len = max_len
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.scale = dim**0.5
        self.blocks = nn.ModuleList(_Block(dim, num_heads, dropout) for _ in range(num_layers))
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, padding_mask: Tensor, last_only: bool = False) -> Tensor:
        """``(B, L, D)`` -> ``(B, L, D)`` (``(B, 1, D)`` with ``last_only``: the last block computes only
        the last position, the one a user embedding reads)."""
        x, padding_mask = x[:, -self.max_len :], padding_mask[:, -self.max_len :]
        length = x.shape[1]
        # Positions count back from the most recent item, which always sits at max_len - 1.
        pos = torch.arange(self.max_len - length, self.max_len, device=x.device)
        # Item embeddings are unit-norm; scaled by sqrt(dim) (as in SASRec) their entries are O(1),
        # so the positions do not drown them.
        h = self.dropout(x * self.scale + self.pos(pos))  # (B, L, D)
        causal = torch.triu(torch.full((length, length), _NEG, device=x.device, dtype=h.dtype), diagonal=1)
        keys = torch.zeros(padding_mask.shape, device=x.device, dtype=h.dtype).masked_fill(padding_mask, _NEG)
        mask = causal + keys[:, None, None, :]  # (B, 1, L, L), additive
        for i, block in enumerate(self.blocks):
            h = block(h, mask, last_only=last_only and i == len(self.blocks) - 1)  # (B, L, D), causal
        return self.norm(h)


class GRUEncoder(nn.Module):
    """A GRU over the history (GRU4Rec-style). The padding steps move its state (the biases act on
    them), so a history is always encoded at the full width it trained with."""

    trims_padding = False

    def __init__(self, dim: int, num_layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        h, _ = self.gru(x.masked_fill(padding_mask.unsqueeze(-1), 0.0))  # (B, L, D)
        return self.out(h)


class MeanPoolEncoder(nn.Module):
    """The running mean of the history embeddings, then a linear map (padding ignored)."""

    trims_padding = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        valid = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        mean = (x * valid).cumsum(dim=1) / valid.cumsum(dim=1).clamp(min=1.0)  # (B, L, D), causal
        return self.out(mean)
