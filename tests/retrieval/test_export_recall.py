"""The recall an export records for user queries (histories through the user tower) against the
model's own full ranking: exact search must find exactly what the model ranks."""

from __future__ import annotations

import pytest

from towerrec.retrieval import load_export

from .conftest import INDEX_CONFIGS


@pytest.mark.parametrize("name", INDEX_CONFIGS)
def test_user_recall_is_recorded_and_exact_for_flat(exports, name):
    recall = load_export(exports[name]).manifest["recall"]
    assert recall["user_queries"] > 0 and recall["k"] == 10
    if name == "flat":
        assert recall["recall_user"] == 1.0  # exact inner-product search over the same vectors
    else:
        assert 0.5 <= recall["recall_user"] <= 1.0


@pytest.mark.parametrize(
    ("user", "item", "target", "says"),
    [
        (0.96, 1.0, 0.95, None),  # the check reaches the target
        (0.917, 1.0, 0.95, "below the target_recall 0.95"),  # tuned to 0.95, checked lower
        (0.917, 1.0, None, None),  # no target (index.target_recall=null): only the warn_below floor
        (0.85, None, 0.95, "(< 0.90)"),  # under the floor: the floor's warning, once
    ],
)
def test_a_check_below_the_tuned_target_is_warned(caplog, user, item, target, says):
    from towerrec.retrieval.writer import _warn_low_recall

    with caplog.at_level("WARNING", logger="towerrec.retrieval.writer"):
        _warn_low_recall({"k": 10, "recall_user": user, "recall_item": item}, 0.9, "auto", target)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if says is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and says in warnings[0]
