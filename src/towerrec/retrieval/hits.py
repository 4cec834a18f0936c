"""What a retrieval query returns: hits, and the error for an id outside the exported catalogue."""

from __future__ import annotations

from dataclasses import dataclass, fields


class UnknownItemError(KeyError):
    """An item id that is not in the exported catalogue."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Hit:
    """One retrieved item."""

    item_id: str
    item_idx: int
    score: float
    title: str
    image: str | None
    is_cold: bool
    because: str | None = None  # history queries: the history item most similar to this one
    because_score: float | None = None

    def to_dict(self) -> dict:
        # Field by field: dataclasses.asdict deep-copies every value, which cost more per served
        # request than the search itself.
        out = {name: getattr(self, name) for name in _FIELDS}
        if self.because is None:
            del out["because"], out["because_score"]
        return out


_FIELDS = tuple(f.name for f in fields(Hit))
