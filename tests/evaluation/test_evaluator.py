"""Evaluation in chunks of users: the same per-user results as one chunk, nothing built whole."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.sequences import load_sequences
from towerrec.evaluation.baselines import Popularity, rank
from towerrec.evaluation.evaluator import score_split
from towerrec.models.checkpoint import load_trained
from towerrec.ranking import rank_metrics


@pytest.fixture(scope="module")
def trained(tiny_ckpt):
    """The tiny checkpoint and its data, with seen items masked (the chunked seen-item path)."""
    model, dm = load_trained(tiny_ckpt)
    masked = SequenceDataModule(str(dm.processed_dir), max_history=dm.max_history, mask_seen=True, eval_batch_size=64)
    masked.setup()
    return model.eval(), masked


def test_split_rows_cut_the_same_rows_however_indexed(trained):
    _, dm = trained
    s = dm.test_split
    n = len(s)
    whole = s.history[:]
    assert whole.shape == (n, dm.max_history) and whole.dtype == torch.long
    rows = np.array([n - 1, 0, 3, 3])
    assert torch.equal(s.history[rows], whole[rows])
    assert torch.equal(s.history[torch.from_numpy(rows)], whole[rows])
    assert torch.equal(s.history[-1], whole[n - 1]) and torch.equal(s.history[2], whole[2])
    mask = np.zeros(n, dtype=bool)
    mask[[1, 4]] = True
    assert torch.equal(s.history[mask], whole[[1, 4]])
    with pytest.raises(IndexError):
        s.history[n]
    # Each user's history is the last max_history items of its sequence before the split (from the maps).
    seq = load_sequences(dm.processed_dir)
    u = int(s.user_idx[5])
    lo, hi = int(seq.offsets[u]), int(seq.ends[u, 1])  # test: the history holds train and val
    expected = np.asarray(seq.items[lo:hi])[-dm.max_history :]
    got = s.history[5].numpy()
    assert got[got != 0].tolist() == expected.tolist()
    # A row's targets and seen items do not depend on the other rows cut with it (only the padding does).
    t_all, t_one = s.targets[:], s.targets[7]
    assert t_all[7][t_all[7] != 0].tolist() == t_one[t_one != 0].tolist()
    seen_all, seen_one = s.seen[:], s.seen[7]
    assert seen_all[7][seen_all[7] != 0].tolist() == seen_one[seen_one != 0].tolist()


def test_evaluation_in_tiny_chunks_gives_the_per_user_metrics_of_one_chunk(trained):
    model, dm = trained
    split, ks = dm.test_split, [5, 10]
    n = len(split)
    one = model.rank_split(split, 10, chunk_users=n, chunk_size=4)  # one chunk (groups of 4 users)
    tiny = model.rank_split(split, 10, chunk_users=3, chunk_size=4)  # a chunk per group of 4 users
    assert torch.equal(one, tiny)
    assert torch.equal(model.rank_split(split, 10, chunk_users=9, chunk_size=4), one)  # chunks of 12
    # Within one group size, the ranking is the model's own (rank) on the whole split's histories.
    assert torch.equal(one, model.rank(split.history[:], 10, seen=split.seen[:], chunk_size=4, score_rows=4).cpu())
    # Seen items are masked within each chunk: no user is recommended an item of its history.
    seen = split.seen[:]
    assert not (one[:, :, None] == seen[:, None, :]).logical_and(seen[:, None, :] != 0).any()

    res_one, per_user_one = score_split(one, split, dm.item_features, ks, chunk_users=n)
    res_tiny, per_user_tiny = score_split(tiny, split, dm.item_features, ks, chunk_users=3)
    pd.testing.assert_frame_equal(per_user_one, per_user_tiny)
    assert json.dumps(res_one, sort_keys=True) == json.dumps(res_tiny, sort_keys=True)  # every slice, to the bit
    # The per-user values are those of the whole split's targets at once.
    whole = rank_metrics(one, split.targets[:], ks)
    assert np.allclose(per_user_one["all/ndcg@10"], whole["ndcg@10"].double().numpy(), equal_nan=True)
    assert per_user_one["user_idx"].tolist() == split.user_idx.tolist()


def test_baseline_ranking_in_chunks_matches_one_chunk(trained):
    _, dm = trained
    baseline = Popularity().fit(dm)
    split = dm.val_split
    one = rank(baseline, split, 10, chunk_size=len(split), chunk_users=len(split))
    assert torch.equal(rank(baseline, split, 10, chunk_size=2, chunk_users=3), one)


def test_validation_batches_are_cut_per_batch(trained):
    _, dm = trained
    split = dm.val_split
    batches = list(dm.val_dataloader())
    assert len(batches) == -(-len(split) // dm.eval_batch_size)
    assert torch.equal(torch.cat([b["row"] for b in batches]), torch.arange(len(split)))
    assert torch.equal(torch.cat([b["history"] for b in batches]), split.history[:])
    assert set(batches[0]) == {"row", "history", "targets", "seen"}


def test_per_user_results_are_written_in_chunks_and_read_back_whole(tmp_path):
    import pyarrow.parquet as pq

    from towerrec.evaluation.per_user import read_per_user, write_per_user

    frame = pd.DataFrame({"user_idx": np.arange(10), "all/ndcg@10": np.r_[np.nan, np.linspace(0, 1, 9)]})
    path = write_per_user(frame, tmp_path / "test_per_user.parquet", "m", "test", {"name": "d", "config_hash": "h"},
                          chunk_rows=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    back, meta = read_per_user(path)
    pd.testing.assert_frame_equal(back, frame)
    assert meta == {"model": "m", "split": "test", "data": {"name": "d", "config_hash": "h"}}
