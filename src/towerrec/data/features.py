"""Per-item features, computed from a processed folder: the tensors the item tower reads, and the
untrained similarity features (TF-IDF content vectors, image thumbnails) that ``content_knn``,
the content sketch of the item tower and reports share.

Data code: it imports neither models nor evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

#: Item index 0 is the padding item in every per-item tensor.
PAD = 0


@dataclass
class ItemFeatures:
    """Per-item tensors for the item tower, row ``i`` = item index ``i`` (row 0 is padding)."""

    images: Tensor  # (N+1, S, S, 3) uint8
    has_image: Tensor  # (N+1,) bool
    categorical: Tensor  # (N+1, F) long, 0 = unknown
    text: Tensor  # (N+1, T) long, 0 = padding
    is_cold: Tensor  # (N+1,) bool: no training interaction
    train_count: Tensor  # (N+1,) long: training interactions
    train_users: Tensor  # (N+1,) long: distinct training users
    cardinalities: list[int] = field(default_factory=list)
    text_buckets: int = 1
    sentence: Tensor | None = None  # optional precomputed sentence-model features (N+1, Ds)

    @property
    def num_items(self) -> int:
        return self.images.shape[0] - 1

    @cached_property
    def looks(self) -> Tensor:
        """:func:`image_features` of the catalogue, computed once: ``content_knn`` and every
        evaluation's ``image_diversity@k`` share it."""
        return image_features(self.images, self.has_image)



def sparse(indices: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A coalesced sparse COO matrix; duplicate indices are summed."""
    return torch.sparse_coo_tensor(indices, values, size, check_invariants=False).coalesce()



def image_features(images: Tensor, has_image: Tensor, chunk_size: int = 2048) -> Tensor:
    """``(N+1, 8*8*3 + 64)`` raw image features: an 8x8 thumbnail and a 4x4x4 colour histogram.

    Each part is centred on the catalogue mean (photos share a background, which would otherwise
    dominate every cosine) and L2-normalised; items without an image get a zero vector.
    """
    parts = []
    levels = torch.tensor([16, 4, 1], dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk_size):
        x = images[start : start + chunk_size].permute(0, 3, 1, 2).float() / 255.0  # (b, 3, S, S)
        thumb = F.adaptive_avg_pool2d(x, 8).flatten(1)  # (b, 192)
        q = images[start : start + chunk_size] >> 6  # (b, S, S, 3), 4 levels per channel
        code = (q * levels).sum(-1, dtype=torch.uint8).flatten(1).long()  # (b, S*S) colour bin
        hist = torch.zeros(len(code), 64).scatter_add_(1, code, torch.ones_like(code, dtype=torch.float))
        parts.append((thumb, hist / code.shape[1]))
    thumb = torch.cat([p[0] for p in parts])
    hist = torch.cat([p[1] for p in parts])
    valid = has_image.clone()
    valid[PAD] = False
    out = []
    for f in (thumb, hist):
        if valid.any():
            f = f - f[valid].mean(dim=0)
        out.append(F.normalize(f, dim=-1))
    return torch.where(valid[:, None], torch.cat(out, dim=1) / math.sqrt(2.0), 0.0)


def content_features(features: ItemFeatures) -> Tensor:
    """``(N+1, sum(cardinalities) + text_buckets)`` sparse TF-IDF rows: one-hot categories + hashed tokens.

    Unknown categories (code 0) and text padding are left out; rows are L2-normalised, so an item
    without metadata has a zero row.
    """
    cat, text = features.categorical, features.text
    n = cat.shape[0]
    offsets = torch.tensor([0, *features.cardinalities[:-1]]).cumsum(0)
    rows = [torch.arange(n).repeat_interleave(cat.shape[1]), torch.arange(n).repeat_interleave(text.shape[1])]
    cols = [(cat + offsets).reshape(-1), text.reshape(-1) + sum(features.cardinalities)]
    known = [cat.reshape(-1) > 0, text.reshape(-1) > 0]
    r = torch.cat([x[k] for x, k in zip(rows, known, strict=True)])
    c = torch.cat([x[k] for x, k in zip(cols, known, strict=True)])
    dim = sum(features.cardinalities) + features.text_buckets
    tf = sparse(torch.stack([r, c]), torch.ones(len(r)), (n, dim))
    i, j = tf.indices()
    df = torch.bincount(j, minlength=dim).float()
    v = tf.values() * (torch.log((1.0 + n) / (1.0 + df[j])) + 1.0)
    norm = torch.zeros(n).index_add_(0, i, v * v).sqrt()
    v = v / norm[i].clamp(min=1e-12)
    return sparse(torch.stack([i, j]), v, (n, dim))
