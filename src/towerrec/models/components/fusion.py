"""Fusion of the item tower's parts into one embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from towerrec.models.components.dropout import Dropout


class ConcatMLPFusion(nn.Module):
    """Concatenate the parts, then a two-layer MLP.

    Args:
        in_dim: size of each part (all parts share it).
        n_inputs: number of parts.
        out_dim: output size.
        hidden: hidden width.
        dropout: dropout in the MLP.
    """

    def __init__(self, in_dim: int, n_inputs: int, out_dim: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim * n_inputs, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, out_dim)
        )

    def forward(self, parts: list[Tensor]) -> Tensor:
        return self.mlp(torch.cat(parts, dim=-1))


class GatedSumFusion(nn.Module):
    """A softmax-gated sum of the projected parts, the gate computed from all parts.

    Select it with ``model/fusion@model.item_tower.fusion=gated``.

    Args:
        in_dim: size of each part (all parts share it).
        n_inputs: number of parts.
        out_dim: output size.
    """

    def __init__(self, in_dim: int, n_inputs: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in range(n_inputs))
        self.gate = nn.Linear(in_dim * n_inputs, n_inputs)

    def forward(self, parts: list[Tensor]) -> Tensor:
        w = torch.softmax(self.gate(torch.cat(parts, dim=-1)), dim=-1)  # (B, P)
        stacked = torch.stack([p(x) for p, x in zip(self.proj, parts, strict=True)], dim=-2)  # (B, P, D)
        return (w.unsqueeze(-1) * stacked).sum(dim=-2)
