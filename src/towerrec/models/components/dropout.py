"""Dropout with a choice of mask: torch's own, or one that costs less on the CPU.

``torch.nn.Dropout`` draws its mask with ``bernoulli_``, one draw of the CPU generator per element:
on the quick start's CPU step the eleven dropouts took a fifth of the step's time (``torch.profiler``,
``aten::bernoulli_``). With ``mask="bits"`` each 64-bit draw of the same seeded generator gives four
16-bit uniform numbers instead, and an element is kept when its number clears ``p`` (``p`` resolved
to 1/65,536). Both are inverted dropout (kept values scaled by ``1 / (1 - p)``, identity in eval mode)
and seeded runs repeat exactly, but they draw different masks, so a model trained with one does not
repeat a run with the other to the digit. Off the CPU, ``bits`` is torch's dropout. No parameters:
checkpoints are the same either way.

The model chooses for all its dropouts at once (``TwoTowerModule(dropout_mask=...)``, through
:func:`set_dropout_mask`); ``torch`` is the default, so runs published before the option repeat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASKS = ("torch", "bits")
_LEVELS = 1 << 16


def dropout(x: Tensor, p: float, training: bool = True, mask: str = "torch") -> Tensor:
    """Inverted dropout of ``x`` with drop probability ``p`` and the ``mask`` of the module docstring."""
    if not training or p == 0.0:
        return x
    if mask == "torch" or x.device.type != "cpu":
        return F.dropout(x, p, True)
    n = x.numel()
    # (n + 3) // 4 draws of 64 random bits, read as n signed 16-bit numbers, uniform on [-32768, 32767].
    # The bounds matter: a plain int64 random_() stays below 2**63, so every fourth number would be >= 0.
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1)
    bits = draws.view(torch.int16)[:n].view(x.shape)
    keep = bits >= round(p * _LEVELS) - _LEVELS // 2
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """``torch.nn.Dropout`` with the mask of :func:`dropout` (``dropout_mask``, set by :func:`set_dropout_mask`)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.dropout_mask = "torch"

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.dropout_mask)

    def extra_repr(self) -> str:
        return f"p={self.p}, mask={self.dropout_mask}"


def set_dropout_mask(module: nn.Module, mask: str) -> None:
    """Give every dropout in ``module`` (each submodule with a ``dropout_mask``) the ``mask``."""
    if mask not in MASKS:
        raise ValueError(f"dropout_mask must be one of {', '.join(MASKS)}, got {mask!r}")
    for m in module.modules():
        if hasattr(m, "dropout_mask"):
            m.dropout_mask = mask
