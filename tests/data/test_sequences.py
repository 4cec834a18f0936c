"""The memory-mapped sequences, the windows cut from them per batch, and the rank-sharded sampler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import towerrec.data.sequences as sequences
from towerrec.data.datamodule import EpochBatchSampler, WindowDataset, train_windows
from towerrec.data.schema import DataError
from towerrec.data.sequences import load_sequences, train_item_counts, write_sequences


def _table(n_users: int = 60, seed: int = 0, gap: bool = True) -> pd.DataFrame:
    """Users 1..n (user 5 missing when ``gap``), each with train, then val, then test interactions."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, n_users)
    if gap:
        sizes[4] = 0
    user = np.repeat(np.arange(1, n_users + 1), sizes)
    code = np.concatenate([np.sort(rng.integers(0, 3, s)) for s in sizes])
    return pd.DataFrame({
        "user_idx": user,
        "item_idx": rng.integers(1, 50, len(user)),
        "timestamp": pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(len(user)), "min"),
        "split": pd.Categorical.from_codes(code, ["train", "val", "test"]),
    })


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(sequences, "_BATCH_ROWS", 97)  # many batches: users straddle their borders


@pytest.mark.parametrize("categorical", [True, False])
def test_sequences_round_trip_the_sorted_table(tmp_path, small_batches, categorical):
    df = _table()
    if not categorical:
        df["split"] = df["split"].astype(str)  # a plain string column, as another writer may store it
    df.to_parquet(tmp_path / "i.parquet", index=False, row_group_size=200)
    info = write_sequences(tmp_path / "i.parquet", tmp_path)
    assert info["positions"] == len(df) and info["users"] == 60 and info["max_item"] == df["item_idx"].max()
    seq = load_sequences(tmp_path)
    assert isinstance(seq.items, np.memmap) and seq.items.dtype == np.int32
    assert np.array_equal(seq.items, df["item_idx"]) and np.array_equal(seq.split, pd.Categorical(df["split"], ["train", "val", "test"]).codes)
    for u in range(0, 61):
        rows = df[df["user_idx"] == u]
        assert seq.offsets[u + 1] - seq.offsets[u] == len(rows)
        assert np.array_equal(seq.items[seq.offsets[u] : seq.offsets[u + 1]], rows["item_idx"])
        for name in ("train", "val", "test"):
            lo, hi = seq.block(name)
            assert np.array_equal(seq.items[lo[u] : hi[u]], rows.loc[rows["split"] == name, "item_idx"])


def test_unsorted_users_and_splits_out_of_time_order_are_refused(tmp_path, small_batches):
    df = _table(gap=False)
    df.iloc[[100, 300]] = df.iloc[[300, 100]].to_numpy()  # two users swapped
    df.to_parquet(tmp_path / "a.parquet", index=False)
    with pytest.raises(DataError, match=r"a\.parquet: row \d+: interactions are not sorted by user_idx$"):
        write_sequences(tmp_path / "a.parquet", tmp_path)
    df = _table(gap=False)
    user = df["user_idx"].to_numpy()
    row = int(np.flatnonzero((df["split"].to_numpy() == "test") & (np.r_[user[1:], 0] == user))[0])  # not the user's last
    df.loc[row + 1, "split"] = "train"
    df.to_parquet(tmp_path / "b.parquet", index=False)
    with pytest.raises(DataError, match=rf"b\.parquet: row {row + 1}: user \d+'s splits are not in time order"):
        write_sequences(tmp_path / "b.parquet", tmp_path)


@pytest.mark.parametrize("max_len", [1, 3, 7])
def test_windows_cut_per_batch_equal_the_materialised_windows(tmp_path, max_len):
    df = _table()
    df.to_parquet(tmp_path / "i.parquet", index=False)
    write_sequences(tmp_path / "i.parquet", tmp_path)
    seq = load_sequences(tmp_path)
    for fit in (("train",), ("train", "val")):
        tr = df[df["split"].isin(fit)]
        x, y = train_windows(tr["user_idx"].to_numpy(), tr["item_idx"].to_numpy(), max_len)
        data = WindowDataset(seq.items, seq.start(), seq.end_of(fit), max_len)
        assert len(data) == len(x)
        rows = np.random.default_rng(1).permutation(len(x))
        got = data[rows.tolist()]
        assert np.array_equal(got["inputs"].numpy(), x[rows]) and np.array_equal(got["targets"].numpy(), y[rows])


@pytest.mark.parametrize(("n", "world"), [(1000, 2), (1001, 2), (999, 3), (10, 4)])
def test_rank_shards_are_disjoint_equal_and_cover_the_epoch(n, world):
    shards = []
    for rank in range(world):
        s = EpochBatchSampler(n, 16, shuffle=True, seed=3, rank=rank, world_size=world)
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == len(s)
        shards.append(batches)
    assert len({len(b) for b in shards}) == 1  # the same number of steps on every rank
    rows = np.concatenate([np.concatenate(b) for b in shards])
    assert len(np.unique(rows)) == len(rows) == n - n % world  # disjoint; all but the n % world left over
    # Step t of W ranks at batch b trains on the rows of step t of one process at batch W * b (the
    # last step may leave out the n % W rows at the end of the permutation).
    one = EpochBatchSampler(n, 16 * world, shuffle=True, seed=3)
    one.set_epoch(2)
    for t, batch in enumerate(one):
        step = np.concatenate([s[t] for s in shards]).tolist()
        assert step == batch[: len(step)] and len(batch) - len(step) == (n % world if t == len(one) - 1 else 0)


def test_one_rank_draws_todays_batches_and_resumes_at_the_next_one():
    import torch

    s = EpochBatchSampler(1000, 64, shuffle=True, seed=42)
    s.set_epoch(3)
    g = torch.Generator().manual_seed(42 * 100003 + 3)
    order = torch.randperm(1000, generator=g)
    assert list(s) == [order[i : i + 64].tolist() for i in range(0, 1000, 64)]
    full = list(s)
    s.resume(3, 5)
    assert list(s) == full[5:]
    assert list(s) == full  # only the resumed epoch skips
    s.resume(2, 5)
    assert list(s) == full  # a position of another epoch is not applied


def test_a_folder_without_sequences_is_refused_in_one_line(tmp_path):
    (tmp_path / "seq_items.npy").write_bytes(b"")  # the others missing, as in a folder of an older prepare
    with pytest.raises(DataError, match=r"^\S+: no seq_split\.npy \(written by an older towerrec-prepare\); run towerrec-prepare force=true$"):
        load_sequences(tmp_path)


def test_users_past_the_first_size_with_and_without_parquet_statistics(tmp_path, small_batches):
    """The per-user counts are sized from the file's statistics, or grown as users appear where the
    writer left none: the same files either way, with every user's offsets and split ends."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = _table(n_users=3000, seed=1)
    table = pa.Table.from_pandas(df, preserve_index=False)
    outs = {}
    for stats in (True, False):
        out = tmp_path / f"stats_{stats}"
        out.mkdir()
        pq.write_table(table, out / "i.parquet", row_group_size=5000, write_statistics=stats)
        assert sequences._max_user(pq.ParquetFile(out / "i.parquet")) == (3000 if stats else None)
        assert write_sequences(out / "i.parquet", out)["users"] == 3000
        outs[stats] = out
    for name in ("seq_items.npy", "seq_split.npy", "seq_offsets.npy", "seq_split_ends.npy"):
        assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
    seq = load_sequences(outs[True])
    per_user = df.groupby("user_idx")["split"].value_counts().unstack(fill_value=0).reindex(range(3001), fill_value=0)
    ends = seq.offsets[:-1, None] + per_user[["train", "val", "test"]].to_numpy().cumsum(axis=1)
    assert np.array_equal(seq.ends, ends)


@pytest.mark.parametrize("chunk_positions", [1, 7, 1 << 20])
def test_train_item_counts_equal_pandas_in_any_chunks(tmp_path, chunk_positions):
    rng = np.random.default_rng(3)
    users = np.sort(rng.integers(1, 60, 700))
    frame = pd.DataFrame({
        "user_idx": users,
        "item_idx": rng.integers(1, 25, 700),  # repeats within a user: purchases count them, buyers do not
        "split": np.where(rng.random(700) < 0.7, "train", "val"),
    })
    frame["split"] = frame.groupby("user_idx")["split"].transform(lambda s: sorted(s, key=["train", "val"].index))
    frame.to_parquet(tmp_path / "interactions.parquet", index=False)
    write_sequences(tmp_path / "interactions.parquet", tmp_path)
    seq = load_sequences(tmp_path)
    assert isinstance(seq.items, np.memmap)  # read with plain reads, a part at a time
    assert sequences.read_slice(seq.items, 13, 400).tolist() == seq.items[13:400].tolist()
    purchases, buyers = train_item_counts(seq, 30, chunk_positions=chunk_positions)
    train = frame[frame["split"] == "train"]
    assert purchases.tolist() == train["item_idx"].value_counts().reindex(range(31), fill_value=0).tolist()
    assert buyers.tolist() == train.groupby("item_idx")["user_idx"].nunique().reindex(range(31), fill_value=0).tolist()
    assert buyers.sum() < purchases.sum()  # the data has repeats
