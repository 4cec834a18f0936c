"""A content-similarity channel: fixed random sketches of each item's TF-IDF content vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from towerrec.data.features import content_features  # the TF-IDF content_knn uses


class ContentSketch(nn.Module):
    """Token-overlap similarity between a user's recent items and any candidate, cold ones included.

    A learned content encoder only knows the tokens and category values it saw on training
    purchases; a cold item described by new words gets little from it. This channel needs no
    training: each item's TF-IDF vector over categorical values and hashed text tokens (the one
    ``content_knn`` uses) is projected by a fixed seeded Gaussian matrix to ``dim`` values
    (Johnson-Lindenstrauss: dot products are kept up to noise of about ``1/sqrt(dim)``) and
    normalised. The item tower appends it to its learned embedding; the user side is the
    normalised mean sketch of the described items among the last ``recent`` of the history,
    scaled by a weight. Items without content get a fixed random unit vector, so every item vector has the
    same norm and the channel scores them about 0, like ``content_knn``.

    Args:
        dim: sketch size; larger keeps the token-overlap cosine more exactly.
        recent: history items averaged on the user side.
        weight: weight of the channel in the user query, against 1 for the learned part.
        in_training: use the channel while training too. With ``False`` the learned part trains
            alone and the channel joins at evaluation and serving (late fusion, weight chosen on
            validation), so training cannot learn to cancel it.
        learn_weight: train the weight too. On H&M it is better fixed and chosen on validation:
            most training purchases are of undescribed articles, where the channel says nothing,
            so training shrinks it, while every test purchase is of a described article.
        seed: seeds the projection, so a model rebuilt from its config gets the same sketches.
    """

    def __init__(
        self,
        dim: int = 512,
        recent: int = 5,
        weight: float = 1.0,
        in_training: bool = True,
        learn_weight: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.recent = recent
        self.seed = seed
        self.in_training = in_training
        self.weight = nn.Parameter(torch.tensor(float(weight)), requires_grad=learn_weight)
        g = torch.Generator().manual_seed(seed)
        # The vector of items without content; rebuilt from the seed, so a served model knows it.
        self.register_buffer("blank", F.normalize(torch.randn(dim, generator=g), dim=0), persistent=False)
        self.register_buffer("items", None, persistent=False)  # (N+1, dim): candidate side

    @torch.no_grad()
    def attach(self, features, device: torch.device) -> None:
        """Build the sketches from :class:`towerrec.data.features.ItemFeatures`."""
        tfidf = content_features(features)  # sparse (N+1, V), L2-normalised rows
        g = torch.Generator().manual_seed(self.seed + 1)
        proj = torch.randn(tfidf.shape[1], self.dim, generator=g) / self.dim**0.5
        sketch = torch.sparse.mm(tfidf, proj)  # (N+1, dim)
        described = torch.zeros(len(sketch), dtype=torch.bool)
        described[tfidf.indices()[0].unique()] = True
        sketch = torch.where(described.unsqueeze(-1), F.normalize(sketch, dim=-1), self.blank.cpu())
        sketch[0] = 0  # padding
        self.items = sketch.to(device)

    def forward(self, idx: Tensor) -> Tensor:
        """Item sketches, ``(...)`` -> ``(..., dim)``, unit norm (0 for padding)."""
        return self.items[idx]

    def user(self, sketches: Tensor, pad: Tensor) -> Tensor:
        """``(B, L, dim)`` sketches of history items -> ``(B, L, dim)``: at each position, the weighted,
        normalised mean sketch of the described items among the last ``recent`` up to it (causal);
        0 if none. Taking sketches, not indices, lets a served model read them from an export."""
        if self.training and not self.in_training:
            return torch.zeros_like(sketches)  # late fusion: the channel is off while training
        described = (sketches @ self.blank < 0.99) & (sketches.abs().sum(-1) > 0)  # (B, L)
        keep = (described & ~pad).unsqueeze(-1)  # (B, L, 1)
        s = torch.where(keep, sketches, 0.0).cumsum(dim=1)  # (B, L, dim)
        s = s - F.pad(s, (0, 0, self.recent, 0))[:, : s.shape[1]]  # window of the last `recent`
        return self.weight * F.normalize(s, dim=-1)
