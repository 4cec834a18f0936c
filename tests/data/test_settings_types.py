"""``data.<group>`` settings are converted by their dataclass field's real type, not its annotation text."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from towerrec.data.schema import DataError
from towerrec.data.settings import SplitSettings, _group


@dataclass(frozen=True)
class Tuning:
    """A settings group with the types a future setting may have."""

    rate: float = 0.5
    limit: float | None = None
    count: int = 1
    label: str = "a"
    on: bool = False


def test_a_float_setting_is_converted():
    got = _group(Tuning, {"tuning": {"rate": 2, "limit": 0.25, "count": 3.0, "on": True}}, "tuning")
    assert got == Tuning(rate=2.0, limit=0.25, count=3, on=True)
    assert type(got.rate) is float and type(got.count) is int
    assert _group(Tuning, {"tuning": {"limit": None}}, "tuning").limit is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rate": "fast"}, r"^data\.tuning\.rate: expected a number, got 'fast'$"),
        ({"limit": True}, r"^data\.tuning\.limit: expected a number, got True$"),
        ({"count": 1.5}, r"^data\.tuning\.count: expected an integer, got 1\.5$"),
        ({"on": "yes"}, r"^data\.tuning\.on: expected true or false, got 'yes'$"),
    ],
)
def test_a_bad_value_is_a_one_line_data_error(values, message):
    with pytest.raises(DataError, match=message):
        _group(Tuning, {"tuning": values}, "tuning")


def test_optional_fields_of_the_real_groups_keep_their_types():
    got = _group(SplitSettings, {"split": {"method": "temporal", "test_days": 7.0, "val_days": 3, "test_start": 20240101}}, "split")
    assert got.test_days == 7 and type(got.test_days) is int and got.test_start == "20240101"
