"""The item tower: ID, image and content parts, fused, projected and L2-normalised."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from towerrec.models.components.content_encoder import ContentEncoder
from towerrec.models.components.content_sketch import ContentSketch
from towerrec.models.components.id_embedding import IdEmbedding
from towerrec.models.components.image_encoder import _ImageEncoder

#: With a sketch, an item vector is ``[learned, sketch] / SKETCH_NORM``: two unit-norm halves make
#: one unit-norm vector. :meth:`ItemTower.learned_part` and :meth:`ItemTower.sketch_part` read them back.
SKETCH_NORM = math.sqrt(2.0)


class ItemTower(nn.Module):
    """Maps item indices to unit-norm embeddings.

    Any subset of the three parts may be given; ablations are config changes. Cold items (no
    training interaction) never use their ID embedding, so they are embedded through the image
    and content parts alone.

    Args:
        dim: embedding size.
        fusion: a partial fusion constructor, called as ``fusion(in_dim=dim, n_inputs=k, out_dim=dim)``.
        id_encoder: the ID embedding (with ID dropout).
        image_encoder: an image encoder; frozen ones have their features computed once per item.
        content_encoder: categorical and text features.
        sketch: an optional untrained content-similarity channel appended to the learned
            embedding; the item vector is then ``[learned, sketch] / SKETCH_NORM``, still unit norm.
        id_residual: add the ID part to the fused image and content parts (``fusion(image, content) +
            id``) instead of fusing it with them. With the ID rows initialised at 0 the tower starts as
            its no-ID ablation and the IDs learn only what image and content miss; a dropped or cold
            ID adds the learned "unknown" vector.
    """

    def __init__(
        self,
        dim: int,
        fusion: Callable[..., nn.Module],
        id_encoder: IdEmbedding | None = None,
        image_encoder: _ImageEncoder | None = None,
        content_encoder: ContentEncoder | None = None,
        sketch: ContentSketch | None = None,
        id_residual: bool = False,
    ) -> None:
        super().__init__()
        self.id_encoder = id_encoder
        self.image_encoder = image_encoder
        self.content_encoder = content_encoder
        n_inputs = sum(m is not None for m in (id_encoder, image_encoder, content_encoder))
        if n_inputs == 0:
            raise ValueError("ItemTower needs at least one of id_encoder, image_encoder, content_encoder")
        self.id_residual = bool(id_residual and id_encoder is not None and n_inputs > 1)
        n_inputs -= self.id_residual  # a residual ID part is added after the fusion, not fused
        self.fusion = fusion(in_dim=dim, n_inputs=n_inputs, out_dim=dim)
        self.no_image = nn.Parameter(torch.zeros(dim)) if image_encoder is not None else None
        self.dim = dim
        self.sketch = sketch
        #: Size of the item vectors: ``dim`` learned values, then the sketch's.
        self.out_dim = dim + (sketch.dim if sketch is not None else 0)
        for name in ("images", "has_image", "categorical", "text", "is_cold", "id_usable", "sentence", "image_cache"):
            self.register_buffer(name, None, persistent=False)

    def attach_features(self, features) -> None:
        """Give the tower the per-item tensors of :class:`towerrec.data.features.ItemFeatures`."""
        device = self.fusion_device
        self.images = features.images.to(device)
        self.has_image = features.has_image.to(device)
        self.categorical = features.categorical.to(device)
        self.text = features.text.to(device)
        self.is_cold = features.is_cold.to(device)
        min_count = self.id_encoder.min_count if self.id_encoder is not None else 1
        self.id_usable = (~features.is_cold & (features.train_count >= min_count)).to(device)
        self.sentence = features.sentence.to(device) if features.sentence is not None else None
        self.image_cache = None
        if self.sketch is not None:
            self.sketch.attach(features, device)

    @property
    def fusion_device(self) -> torch.device:
        return next(self.fusion.parameters()).device

    @property
    def frozen_image(self) -> bool:
        return self.image_encoder is not None and not self.image_encoder.trainable

    def _build_image_cache(self) -> None:
        """Frozen backbone: its features of every item, computed once (or read from its disk cache)."""
        self.image_cache = self.image_encoder.catalog_features(self.images)

    def forward(self, idx: Tensor, drop_ids: bool = True) -> Tensor:
        """``(...)`` item indices -> ``(..., out_dim)``; ``drop_ids=False`` turns ID dropout off for this call."""
        return self.forward_views(idx, (drop_ids,))[0]

    def forward_views(self, idx: Tensor, drop_ids: tuple[bool, ...]) -> list[Tensor]:
        """The item vectors of ``idx`` once per ID-dropout setting in ``drop_ids``, e.g. ``(True, False)``
        for the dropped candidates and the kept histories of ``id_dropout_side=candidates``.

        The image and content parts (the costly ones) are computed once and shared by every view: the
        views differ only in their ID part.
        """
        shape = idx.shape
        flat = idx.reshape(-1)
        # The ID parts first: with one view, random numbers are drawn in the same order as ever.
        ids = [self.id_encoder(flat, warm=self.id_usable[flat], drop=d) for d in drop_ids] if self.id_encoder is not None else []
        shared: list[Tensor] = []
        if self.image_encoder is not None:
            if self.frozen_image:
                if self.image_cache is None or self.image_cache.device != flat.device:
                    self._build_image_cache()
                img = self.image_encoder.head(self.image_cache[flat])
            else:
                img = self.image_encoder(self.images[flat])
            img = torch.where(self.has_image[flat].unsqueeze(-1), img, self.no_image.expand_as(img))
            shared.append(img)
        if self.content_encoder is not None:
            sent = self.sentence[flat] if self.sentence is not None else None
            shared.append(self.content_encoder(self.categorical[flat], self.text[flat], sent))
        sketch = self.sketch(flat) if self.sketch is not None else None
        views = []
        for v in range(len(drop_ids)):
            if self.id_residual:
                out = F.normalize(self.fusion(shared) + ids[v], dim=-1)  # (B*, D)
            else:
                out = F.normalize(self.fusion([ids[v], *shared] if ids else shared), dim=-1)
            if sketch is not None:
                out = torch.cat([out, sketch], dim=-1) / SKETCH_NORM
            views.append(out.reshape(*shape, self.out_dim))
        return views

    def learned_part(self, vectors: Tensor) -> Tensor:
        """The learned values of item vectors ``(..., out_dim) -> (..., dim)``, as stored (scaled with a sketch)."""
        return vectors[..., : self.dim]

    def sketch_part(self, vectors: Tensor) -> Tensor:
        """The unit-norm content sketches of item vectors ``(..., out_dim) -> (..., sketch.dim)``."""
        return vectors[..., self.dim :] * SKETCH_NORM

    @torch.no_grad()
    def embed_all(self, chunk: int = 4096) -> Tensor:
        """Embeddings of every item, ``(N+1, D)``; row 0 (padding) is zero."""
        n = len(self.is_cold)
        idx = torch.arange(n, device=self.is_cold.device)
        out = torch.cat([self(idx[i : i + chunk]) for i in range(0, n, chunk)])
        out[0] = 0
        return out
