"""Which interactions a user's history holds at each evaluation split: the leakage-critical rule.

The model (through :class:`~towerrec.data.datamodule.SequenceDataModule`) and every baseline read
histories through :func:`history_splits`, so both are always scored on the same history. Validation
sees training only; the test split also sees validation, which precedes the test cut in time.
"""

from __future__ import annotations

#: Evaluation splits, in time order.
EVAL_SPLITS: tuple[str, ...] = ("val", "test")

_HISTORY_SPLITS: dict[str, tuple[str, ...]] = {"val": ("train",), "test": ("train", "val")}


def history_splits(split: str) -> tuple[str, ...]:
    """The processed-table splits that form a user's history when ``split`` is evaluated."""
    if split not in _HISTORY_SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}: expected one of {list(EVAL_SPLITS)}")
    return _HISTORY_SPLITS[split]
