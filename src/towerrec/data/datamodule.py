"""The LightningDataModule: processed folder -> training windows, evaluation splits, item features."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from towerrec.data.features import ItemFeatures
from towerrec.data.image_cache import load_image_cache
from towerrec.data.manifest import load_manifest
from towerrec.data.schema import DataError
from towerrec.data.sentence_features import load_sentence_features
from towerrec.data.sequences import Sequences, distinct_items, first_items, last_items, load_sequences, ranges
from towerrec.data.splits import EVAL_SPLITS, history_splits
from towerrec.fileio import load_npy

log = logging.getLogger(__name__)


class SplitRows:
    """A lazy ``(U, W)`` int64 matrix of one evaluation split, cut from the memory-mapped sequences for
    the rows asked for: ``rows[i]`` is ``(W,)``, ``rows[a:b]`` or ``rows[index]`` is ``(n, W)``.

    Nothing of the whole split is held: each access reads its rows' positions from the maps. Targets
    and seen items are right-padded with 0 to the widest of the rows asked for, so ``W`` depends on
    them (a row's own values do not); histories are ``max_history`` wide, left-padded.

    Args:
        n: rows (users) of the split.
        cut: ``(n,)`` int64 row indices -> ``(n, W)`` int64 array.
    """

    def __init__(self, n: int, cut) -> None:
        self.n, self._cut = n, cut

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, (int, np.integer)) or (isinstance(index, Tensor) and index.dim() == 0):
            i = int(index)
            if not -self.n <= i < self.n:
                raise IndexError(f"row {i} outside a split of {self.n} users")
            return self[np.array([i % self.n])][0]
        if isinstance(index, slice):
            rows = np.arange(*index.indices(self.n), dtype=np.int64)
        else:
            rows = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            rows = rows.astype(np.int64, copy=False)
            if len(rows) and (rows.min() < -self.n or rows.max() >= self.n):
                raise IndexError(f"rows outside a split of {self.n} users")
            rows = rows % max(self.n, 1)
        return torch.from_numpy(self._cut(rows))


@dataclass
class EvalSplit:
    """History -> held-out items for every user with an interaction in one split.

    Rows are users. Only per-user vectors are held (``user_idx``, ``history_len``); the histories,
    targets and seen items are :class:`SplitRows`, cut from the memory-mapped sequences for the rows a
    caller asks for (a batch or a chunk of users), so nothing that grows with users x history is
    ever built whole.
    """

    name: str
    user_idx: Tensor  # (U,)
    history: SplitRows  # (U, max_history) long, left-padded, most recent last
    history_len: Tensor  # (U,) full history length (before truncation)
    targets: SplitRows  # (U, T) distinct held-out items, right-padded with 0 (T: the rows' widest, <= max_targets)
    seen: SplitRows | None  # (U, S) full history, for masking seen items; None when not masked
    all_users: pd.DataFrame  # users.parquet, every user (segments are read from it on demand)
    n_train_users: int = 0  # users with a training interaction (for novelty)

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def users(self) -> pd.DataFrame:
        """Segments etc. of the split's users, aligned with the rows (built on each call)."""
        return self.all_users.set_index("user_idx").reindex(self.user_idx.numpy()).reset_index()


def _eval_split(seq: Sequences, users_table: pd.DataFrame, name: str, max_history: int, max_targets: int,
                mask_seen: bool) -> EvalSplit:
    """The :class:`EvalSplit` ``name`` over the memory-mapped sequences ``seq``."""
    lo_all, hi_all = seq.block(name)
    users = np.flatnonzero(np.asarray(hi_all) > np.asarray(lo_all)).astype(np.int64)  # user 0 holds nothing
    start_all, end_all = seq.start(), seq.end_of(history_splits(name))
    hlen = np.asarray(end_all)[users] - np.asarray(start_all)[users]

    def history(rows: np.ndarray) -> np.ndarray:
        u = users[rows]
        return last_items(seq.items, start_all[u], end_all[u], max_history)

    def targets(rows: np.ndarray) -> np.ndarray:
        u = users[rows]
        return distinct_items(seq.items, lo_all[u], hi_all[u], max_targets)[0]

    def seen(rows: np.ndarray) -> np.ndarray:
        u = users[rows]
        return first_items(seq.items, start_all[u], end_all[u], int(max(hlen[rows].max(initial=1), 1)))

    # Only users with more held-out positions than the cap can lose targets: count their distinct items.
    many = np.flatnonzero((np.asarray(hi_all) - np.asarray(lo_all))[users] > max_targets)
    n_dropped = 0
    for c in range(0, len(many), 4096):
        u = users[many[c : c + 4096]]
        n_dropped += int((distinct_items(seq.items, lo_all[u], hi_all[u], max_targets)[1] > max_targets).sum())
    if n_dropped:
        log.warning("%s: %d users have more than %d targets; extra targets dropped", name, n_dropped, max_targets)
    return EvalSplit(
        name=name,
        user_idx=torch.from_numpy(users),
        history=SplitRows(len(users), history),
        history_len=torch.from_numpy(hlen.astype(np.int64)),
        targets=SplitRows(len(users), targets),
        seen=SplitRows(len(users), seen) if mask_seen else None,
        all_users=users_table,
        n_train_users=int((users_table["n_train"] > 0).sum()),
    )


class _SplitBatches(Dataset):
    """An evaluation split's batches, indexed by a whole list of rows and cut from the maps when drawn."""

    def __init__(self, split: EvalSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, rows: list[int]) -> dict[str, Tensor]:
        s, idx = self.split, np.asarray(rows, dtype=np.int64)
        batch = {"row": torch.from_numpy(idx), "history": s.history[idx], "targets": s.targets[idx]}
        if s.seen is not None:
            batch["seen"] = s.seen[idx]
        return batch


class WindowDataset(Dataset):
    """The training windows of :func:`train_windows`, cut from the memory-mapped sequences when a
    batch is drawn.

    Window ``w`` is the ``j``-th window from the end of user ``u``'s fit sequence, where
    ``win_start[u] <= w < win_start[u + 1]`` and ``j = w - win_start[u]``; only per-user arrays are
    held (``(U + 2,)`` int64), never the windows.

    Args:
        items: ``(N,)`` item ids of all users, user by user (memory-mapped).
        start: ``(U + 1,)`` each user's first position.
        end: ``(U + 1,)`` where each user's fit positions end (a time-ordered prefix of the user).
        max_len: positions per window.
    """

    def __init__(self, items: np.ndarray, start: np.ndarray, end: np.ndarray, max_len: int) -> None:
        self.items, self.max_len = items, max_len
        self.start = np.asarray(start, dtype=np.int64)
        self.pairs = np.maximum(np.asarray(end, dtype=np.int64) - self.start - 1, 0)  # next-item pairs per user
        self.win_start = np.zeros(len(self.start) + 1, dtype=np.int64)
        np.cumsum((self.pairs + max_len - 1) // max_len, out=self.win_start[1:])

    def __len__(self) -> int:
        return int(self.win_start[-1])

    def windows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B,)`` window indices -> inputs, targets ``(B, max_len)`` int64, right-aligned, 0-padded."""
        rows = np.asarray(rows, dtype=np.int64)
        user = np.searchsorted(self.win_start, rows, side="right") - 1
        start = self.start[user]
        end = start + self.pairs[user] - (rows - self.win_start[user]) * self.max_len  # one past the last input
        pos = end[:, None] - self.max_len + np.arange(self.max_len)  # (B, L)
        valid = pos >= start[:, None]
        pos = np.where(valid, pos, start[:, None])
        inputs = np.where(valid, self.items[pos], 0).astype(np.int64)
        targets = np.where(valid, self.items[pos + 1], 0).astype(np.int64)
        return inputs, targets

    def __getitem__(self, rows: list[int]) -> dict[str, Tensor]:
        x, y = self.windows(np.asarray(rows, dtype=np.int64))
        return {"inputs": torch.from_numpy(x), "targets": torch.from_numpy(y)}

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Every window at once (``inputs``, ``targets``): for tests and small data only."""
        return self[np.arange(len(self))]


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of row indices, shuffled by a generator seeded from ``(seed, epoch)``, sharded over
    ranks, and resumable inside an epoch.

    Each epoch is one permutation of the rows (``torch.randperm``, seeded by ``(seed, epoch)``), cut
    into global batches of ``batch_size * world_size`` rows; rank ``r`` takes the ``r``-th equal part
    of each. So the ranks' batches are disjoint, every rank draws the same number of batches, and a
    run on ``W`` processes at ``batch_size`` trains on the same global batches as one process at
    ``W * batch_size``. When ``W`` does not divide the number of rows, the last ``n % W`` rows of the
    epoch's permutation are left out of that epoch (the next epoch's permutation differs).

    Lightning calls :meth:`set_epoch` before each epoch, so the order of an epoch is the same whether
    or not the run was resumed; :meth:`resume` skips the batches a checkpoint had already trained on.
    Evaluation (``shuffle=False``) shards whole batches round-robin instead, and is never resumed.
    """

    def __init__(
        self, n: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already drawn in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """Start epoch ``epoch`` at its batch ``batches`` (the next iteration of that epoch only)."""
        self._resume = (epoch, batches)

    def __len__(self) -> int:
        if not self.shuffle:
            total = (self.n + self.batch_size - 1) // self.batch_size
            return len(range(self.rank, total, self.world_size))
        per_rank = self.n // self.world_size
        return (per_rank + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                skip = self._resume[1]
            self._resume = None
        if not self.shuffle:
            total = (self.n + self.batch_size - 1) // self.batch_size
            for b in range(self.rank, total, self.world_size):
                yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.n)))
            return
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        per_rank, w = self.n // self.world_size, self.world_size
        for i in range(skip * self.batch_size, per_rank, self.batch_size):
            size = min(self.batch_size, per_rank - i)  # this batch's rows per rank
            lo = i * w + self.rank * size
            yield order[lo : lo + size].tolist()


class _ResumableLoader(DataLoader):
    """A DataLoader whose ``state_dict`` is where its epoch stands (Lightning stores it in every
    checkpoint and hands it back on resume, see ``FitLoop.on_save_checkpoint``).

    Args:
        done: returns the batches of the current epoch already trained on (the trainer's count, not
            the sampler's, which runs ahead by the batches prefetched).
    """

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, done, **kwargs) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)
        self._done = done

    def state_dict(self) -> dict:
        s = self.sampler
        return {"epoch": s.epoch, "batches": int(self._done()), "rows": s.n, "global_batch": s.batch_size * s.world_size}

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        if (state.get("rows"), state.get("global_batch")) != (s.n, s.batch_size * s.world_size):
            raise DataError(
                f"resume: the checkpoint's epoch has {state.get('rows')} windows in global batches of "
                f"{state.get('global_batch')}, this run {s.n} in batches of {s.batch_size} x {s.world_size} "
                "processes; resume with the same data, datamodule.batch_size and number of processes"
            )
        s.resume(int(state["epoch"]), int(state["batches"]))


def train_windows(user: np.ndarray, item: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All-position next-item windows from interactions sorted by user then time.

    Each user's sequence ``s`` gives inputs ``s[:-1]`` and targets ``s[1:]``, cut from the end into
    windows of ``max_len`` positions, right-aligned (left-padded with 0).

    Returns:
        inputs, targets: (n_windows, max_len) int64.
    """
    if len(user) == 0:
        return np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64)
    same_next = np.r_[user[1:] == user[:-1], False]  # row has a successor of the same user
    src = np.flatnonzero(same_next)
    x, y, u = item[src], item[src + 1], user[src]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    sizes = np.diff(np.r_[starts, len(u)])
    from_end = np.repeat(starts + sizes - 1, sizes) - np.arange(len(u))
    n_win = (sizes + max_len - 1) // max_len
    win_offset = np.repeat(np.r_[0, np.cumsum(n_win)[:-1]], sizes)
    win = win_offset + from_end // max_len
    slot = max_len - 1 - from_end % max_len
    inputs = np.zeros((int(n_win.sum()), max_len), np.int64)
    targets = np.zeros_like(inputs)
    inputs[win, slot] = x
    targets[win, slot] = y
    return inputs, targets


class SequenceDataModule(L.LightningDataModule):
    """Reads a processed folder (see :mod:`towerrec.data.build`).

    Args:
        processed_dir: the folder ``towerrec-prepare`` wrote.
        max_len: training window length (positions per sequence).
        batch_size: training windows per batch.
        eval_batch_size: users per evaluation batch.
        max_history: history items the user tower reads at evaluation.
        mask_seen: remove each user's already-seen items from the ranking.
        max_targets: cap on distinct held-out items per user (the rest are counted and dropped).
        num_workers: DataLoader workers.
        sentence_features: optional ``.npy`` of precomputed sentence-model item features.
        seed: seeds the shuffling (with the epoch number).
        fit_splits: the processed splits the model trains on: ``[train]``, or ``[train, val]`` to refit
            on the validation window as well once the number of epochs was chosen on it
            (``towerrec-train refit=true``). The model's warm/cold flags and item counts
            (:attr:`model_features`) follow them; evaluation slices keep the data's own (no training
            interaction), so a refit model is scored on the same slices as the rest.
    """

    def __init__(
        self,
        processed_dir: str,
        max_len: int = 50,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        max_history: int = 50,
        mask_seen: bool = False,
        max_targets: int = 500,
        num_workers: int = 0,
        sentence_features: str | None = None,
        seed: int = 0,
        fit_splits: list[str] | tuple[str, ...] = ("train",),
    ) -> None:
        super().__init__()
        fit_splits = tuple(fit_splits)
        if fit_splits not in (("train",), ("train", "val")):
            raise DataError(f"datamodule.fit_splits: expected [train] or [train, val], got {list(fit_splits)}")
        # Plain values: a checkpoint records them, so the data of a trained model can be rebuilt.
        self.save_hyperparameters(logger=False)
        self.processed_dir = Path(processed_dir)
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_history = max_history
        self.mask_seen = mask_seen
        self.max_targets = max_targets
        self.num_workers = num_workers
        self.sentence_features = sentence_features
        self.seed = seed
        self.fit_splits = fit_splits
        self._loaded = False

    # ------------------------------------------------------------------ loading
    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        d = self.processed_dir
        self.manifest = load_manifest(d)  # raises a one-line DataError unless the folder is complete
        self.sequences = load_sequences(d)  # memory-mapped: nothing per interaction is read here
        self.items = pd.read_parquet(d / "items.parquet")
        self.users = pd.read_parquet(d / "users.parquet")
        cold = np.r_[True, self.items["is_cold"].to_numpy()]
        count = np.r_[0, self.items["train_count"].to_numpy()]
        sentence, self.sentence_info = None, None
        if self.sentence_features:  # refused in one line unless built for these items (its sidecar says)
            values, self.sentence_info = load_sentence_features(self.sentence_features, self.items, self.manifest)
            sentence = torch.from_numpy(values)
        self.item_features = ItemFeatures(
            images=torch.from_numpy(load_image_cache(d / "images.npy")),  # memory-mapped, not copied
            has_image=torch.from_numpy(np.r_[False, self.items["has_image"].to_numpy()]),
            categorical=torch.from_numpy(load_npy(d / "item_categorical.npy")),
            text=torch.from_numpy(load_npy(d / "item_text.npy")),
            is_cold=torch.from_numpy(cold),
            train_count=torch.from_numpy(count.astype(np.int64)),
            train_users=torch.from_numpy(np.r_[0, self.items["train_users"].to_numpy()].astype(np.int64)),
            cardinalities=list(self.manifest["features"]["categorical"].values()),
            text_buckets=int(self.manifest["features"]["text_buckets"]),
            sentence=sentence,
        )
        seq = self.sequences
        fit_end = seq.end_of(self.fit_splits)
        self.model_features = (
            self.item_features if self.fit_splits == ("train",) else _fit_features(self.item_features, seq, fit_end)
        )
        self.train_data = WindowDataset(seq.items, seq.start(), fit_end, self.max_len)
        self.val_split, self.test_split = (
            _eval_split(seq, self.users, name, self.max_history, self.max_targets, self.mask_seen)
            for name in EVAL_SPLITS
        )
        self._loaded = True
        log.info("train windows %d, val users %d, test users %d", len(self.train_data), len(self.val_split), len(self.test_split))

    @property
    def interactions(self) -> pd.DataFrame:
        """The whole ``interactions.parquet`` as a DataFrame, read on first use (the baselines' input;
        training and evaluation of the model read the memory-mapped sequences instead)."""
        if getattr(self, "_interactions", None) is None:
            self._interactions = pd.read_parquet(self.processed_dir / "interactions.parquet")
        return self._interactions

    @property
    def meta(self) -> dict:
        """Sizes the model's components need, read from the processed data, and the data's hash."""
        f = self.item_features
        return {
            "config_hash": self.manifest.get("config_hash"),
            "num_items": f.num_items,
            "categorical_cardinalities": f.cardinalities,
            "text_buckets": f.text_buckets,
            "image_size": int(f.images.shape[1]),
            "sentence_dim": int(f.sentence.shape[1]) if f.sentence is not None else 0,
            # The sentence-features file and model a run used (file, sha256, model, version), or None.
            "sentence_features": self.sentence_info,
        }

    def eval_split(self, name: str) -> EvalSplit:
        """The set-up :class:`EvalSplit` ``"val"`` or ``"test"``."""
        if name not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {name!r}: expected one of {list(EVAL_SPLITS)}")
        return getattr(self, f"{name}_split")

    # ------------------------------------------------------------------ loaders
    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _trained_batches(self) -> int:
        """Batches of the current epoch the trainer has trained on (0 without a trainer)."""
        t = self.trainer
        return t.fit_loop.epoch_loop.batch_progress.current.processed if t is not None else 0

    def _eval_loader(self, s: EvalSplit) -> DataLoader:
        data = _SplitBatches(s)
        # Every rank scores every user: exact means (the same on each rank) for checkpoint selection, and
        # no rank without batches to hang the metric's all-reduce.
        sampler = EpochBatchSampler(len(data), self.eval_batch_size, False, self.seed)
        return DataLoader(data, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochBatchSampler(len(self.train_data), self.batch_size, True, self.seed, *self._rank())
        return _ResumableLoader(self.train_data, sampler, self._trained_batches, num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_split)


def _fit_features(features: ItemFeatures, seq: Sequences, fit_end: np.ndarray, chunk_users: int = 65536) -> ItemFeatures:
    """``features`` with the warm/cold flags and counts of the fit positions (each user's
    ``start:fit_end``), counted ``chunk_users`` users at a time."""
    n = features.num_items + 1
    count = np.zeros(n, dtype=np.int64)
    users = np.zeros(n, dtype=np.int64)
    start = np.asarray(seq.start())
    for c in range(0, len(start), chunk_users):
        lo, hi = start[c : c + chunk_users], fit_end[c : c + chunk_users]
        if hi.sum() == lo.sum():
            continue
        items = np.asarray(seq.items[lo[0] : hi[-1]])  # the chunk's users are contiguous
        row = np.repeat(np.arange(len(lo)), hi - lo)
        pos = ranges(lo - lo[0], hi - lo[0])
        item = items[pos].astype(np.int64)
        count += np.bincount(item, minlength=n)
        users += np.bincount(np.unique(row * n + item) % n, minlength=n)
    count[0] = users[0] = 0
    return dataclasses.replace(
        features,
        is_cold=torch.from_numpy(count == 0),
        train_count=torch.from_numpy(count),
        train_users=torch.from_numpy(users),
    )
