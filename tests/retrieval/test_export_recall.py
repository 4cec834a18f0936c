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
