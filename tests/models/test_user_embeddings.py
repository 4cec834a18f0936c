"""User embeddings at each history's own length: the padding cut off for the towers that ignore it."""

from __future__ import annotations

import pytest
import torch

from towerrec.commands.train import build
from towerrec.models.two_tower import history_lengths


@pytest.fixture(params=["sasrec", "mean", "gru"])
def model_and_histories(request, tiny_train_cfg):
    dm, model, _ = build(tiny_train_cfg(f"model/user_tower={request.param}"))
    model.attach_features(dm.model_features)
    model.eval()
    split = dm.val_split
    history = split.history[torch.arange(len(split)).numpy()]  # (U, L) left-padded
    return model, history


def test_each_user_gets_the_embedding_of_its_own_history(model_and_histories):
    """Users of many lengths in one call, embedded in groups of equal length: every row goes back to
    its user (alone, or in reverse order, the same vectors up to the rounding of other matrix shapes)."""
    model, history = model_and_histories
    assert len(torch.unique(history_lengths(history))) > 3  # users of many lengths share the call
    with torch.no_grad():
        item_emb = model.item_tower.embed_all()
        together = model.user_embeddings(history, item_emb)
        alone = torch.cat([model.user_embeddings(history[i : i + 1], item_emb) for i in range(len(history))])
        reversed_ = model.user_embeddings(history.flip(0), item_emb).flip(0)
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    assert torch.allclose(together, reversed_, atol=1e-5, rtol=0)
    assert not torch.allclose(together, together.roll(1, 0), atol=1e-3, rtol=0)  # rows differ between users


def test_cutting_the_padding_changes_the_embeddings_by_rounding_only(model_and_histories):
    model, history = model_and_histories
    with torch.no_grad():
        item_emb = model.item_tower.embed_all()
        trimmed = model.user_embeddings(history, item_emb)
        full = model._user_embeddings(history, item_emb)  # every history at the full width
        pad = history == 0
        pad[:, -1] = False
        every_position = model.queries(item_emb[history], pad)[:, -1]  # as training computes them
    assert torch.allclose(full, every_position, atol=1e-5, rtol=0)
    assert not torch.allclose(full, every_position.roll(1, 0), atol=1e-3, rtol=0)
    if getattr(model.user_tower, "trims_padding", False):
        assert torch.allclose(trimmed, full, atol=1e-5, rtol=0)
        wide = torch.cat([torch.zeros(len(history), 7, dtype=history.dtype), history], dim=1)  # more padding
        assert torch.equal(model.user_embeddings(wide, item_emb), trimmed)
    else:  # the GRU's state moves on padding: always the full width
        assert torch.equal(trimmed, full)
