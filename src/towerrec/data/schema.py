"""The canonical data model every source produces, and the error type for bad input.

A source reads its own files and returns a :class:`RawDataset`. Everything after that
(splitting, id mapping, the image cache, the manifest) is source-agnostic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# Interactions: one row per event, in source row order.
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp"]  # required
INTERACTION_OPTIONAL = ["price", "quantity", "channel"]


class DataError(ValueError):
    """Bad input. The message is one line naming the file and the row or column."""


@dataclass
class RawDataset:
    """A source's output, before splitting.

    Attributes:
        interactions: columns ``user_id`` (str), ``item_id`` (str), ``timestamp``
            (datetime64[ns]) and optionally ``price`` (float), ``quantity`` (int),
            ``channel`` (str/int). Row order is the source row order; it breaks timestamp ties.
        items: the catalog, ``item_id`` (str, unique) plus categorical fields (str), free-text
            fields (str) and ``image_path`` (str or None). May list items with no interaction.
        users: optional attributes keyed by ``user_id`` (str); may be empty.
        categorical: names of the categorical columns of ``items``.
        text: names of the free-text columns of ``items``.
        images: alternatively to ``image_path``, an in-memory uint8 array (n_items, H, W, 3)
            aligned with ``items`` rows (the synthetic source renders its images directly).
        skipped: rows dropped, by reason (counted, reported in the manifest).
        repaired: rows changed, by reason (e.g. same-day repeats merged into a quantity).
        sources: input files (path -> {"bytes": int, "sha256": str}) or generator parameters.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"user_id": pd.Series([], dtype=str)}))
    categorical: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    images: np.ndarray | None = None
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    sources: dict = field(default_factory=dict)
