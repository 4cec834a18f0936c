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
from towerrec.data.splits import EVAL_SPLITS, history_splits

log = logging.getLogger(__name__)


@dataclass
class EvalSplit:
    """History -> held-out items for every user with an interaction in one split.

    Rows are users; all tensors share the first dimension ``U``.
    """

    name: str
    user_idx: Tensor  # (U,)
    history: Tensor  # (U, max_history) long, left-padded, most recent last
    history_len: Tensor  # (U,) full history length (before truncation)
    targets: Tensor  # (U, T) distinct held-out items, right-padded with 0
    seen: Tensor | None  # (U, S) full history, for masking seen items; None when not masked
    users: pd.DataFrame  # segments etc., aligned with the rows
    n_train_users: int = 0  # users with a training interaction (for novelty)

    def __len__(self) -> int:
        return len(self.user_idx)


class _BatchDataset(Dataset):
    """Indexed by a whole list of rows: one fancy-index per batch, no per-sample Python."""

    def __init__(self, **tensors: Tensor | None) -> None:
        self.tensors = {k: v for k, v in tensors.items() if v is not None}
        self.n = len(next(iter(self.tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of row indices, shuffled by a generator seeded from ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before each epoch, so the order of an epoch is the same
    whether or not the run was resumed from a checkpoint.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        yield from (order[i : i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size))


def _pad_groups(group: np.ndarray, values: np.ndarray, width: int, align: str) -> np.ndarray:
    """Scatter ``values`` grouped by sorted ``group`` codes (0..G-1) into a (G, width) array.

    ``align="right"`` keeps each group's last ``width`` values, right-aligned (left padding);
    ``align="left"`` keeps the first ``width`` values, left-aligned.
    """
    n_groups = int(group.max()) + 1 if len(group) else 0
    out = np.zeros((n_groups, width), dtype=np.int64)
    if not len(group):
        return out
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    sizes = np.diff(np.r_[starts, len(group)])
    pos = np.arange(len(group)) - np.repeat(starts, sizes)
    if align == "right":
        slot = width - np.repeat(sizes, sizes) + pos
    else:
        slot = pos
    keep = (slot >= 0) & (slot < width)
    out[group[keep], slot[keep]] = values[keep]
    return out


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
    """Reads a processed folder (see :mod:`towerrec.data.prepare`).

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
        self.interactions = pd.read_parquet(d / "interactions.parquet")
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
            categorical=torch.from_numpy(np.load(d / "item_categorical.npy")),
            text=torch.from_numpy(np.load(d / "item_text.npy")),
            is_cold=torch.from_numpy(cold),
            train_count=torch.from_numpy(count.astype(np.int64)),
            train_users=torch.from_numpy(np.r_[0, self.items["train_users"].to_numpy()].astype(np.int64)),
            cardinalities=list(self.manifest["features"]["categorical"].values()),
            text_buckets=int(self.manifest["features"]["text_buckets"]),
            sentence=sentence,
        )
        split = self.interactions["split"].to_numpy()
        tr = self.interactions[np.isin(split, self.fit_splits)]
        self.model_features = self.item_features if self.fit_splits == ("train",) else _fit_features(self.item_features, tr)
        x, y = train_windows(tr["user_idx"].to_numpy(), tr["item_idx"].to_numpy(), self.max_len)
        self.train_data = _BatchDataset(inputs=torch.from_numpy(x), targets=torch.from_numpy(y))
        self.val_split = self._eval_split("val")
        self.test_split = self._eval_split("test")
        self._loaded = True
        log.info("train windows %d, val users %d, test users %d", len(x), len(self.val_split), len(self.test_split))

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

    def _eval_split(self, name: str) -> EvalSplit:
        inter = self.interactions
        split = inter["split"].to_numpy()
        held = inter[split == name].drop_duplicates(["user_idx", "item_idx"])  # distinct targets
        users = np.unique(held["user_idx"].to_numpy())
        code = pd.Series(np.arange(len(users)), index=users)
        hist = inter[np.isin(split, history_splits(name)) & inter["user_idx"].isin(users).to_numpy()]
        hcode = code.loc[hist["user_idx"].to_numpy()].to_numpy()
        hitems = hist["item_idx"].to_numpy()
        tcode = code.loc[held["user_idx"].to_numpy()].to_numpy()
        n_t = np.bincount(tcode, minlength=len(users))
        if (n_t > self.max_targets).any():
            log.warning("%s: %d users have more than %d targets; extra targets dropped", name, int((n_t > self.max_targets).sum()), self.max_targets)
        width = int(min(max(n_t.max(initial=1), 1), self.max_targets))
        history = _pad_groups_full(hcode, hitems, len(users), self.max_history, "right")
        targets = _pad_groups_full(tcode, held["item_idx"].to_numpy(), len(users), width, "left")
        hlen = np.bincount(hcode, minlength=len(users))
        seen = None
        if self.mask_seen:
            seen_w = int(max(hlen.max(initial=1), 1))
            seen = torch.from_numpy(_pad_groups_full(hcode, hitems, len(users), seen_w, "left"))
        seg = self.users.set_index("user_idx").reindex(users).reset_index()
        return EvalSplit(
            name=name,
            user_idx=torch.from_numpy(users.astype(np.int64)),
            history=torch.from_numpy(history),
            history_len=torch.from_numpy(hlen.astype(np.int64)),
            targets=torch.from_numpy(targets),
            seen=seen,
            users=seg,
            n_train_users=int((self.users["n_train"] > 0).sum()),
        )

    # ------------------------------------------------------------------ loaders
    def _loader(self, data: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            sampler=EpochBatchSampler(len(data), batch_size, shuffle, self.seed),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_dataset(self, s: EvalSplit) -> Dataset:
        return _BatchDataset(row=torch.arange(len(s)), history=s.history, targets=s.targets, seen=s.seen)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._eval_dataset(self.val_split), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._eval_dataset(self.test_split), self.eval_batch_size, shuffle=False)


def _fit_features(features: ItemFeatures, fit: pd.DataFrame) -> ItemFeatures:
    """``features`` with the warm/cold flags and counts of the interactions ``fit`` the model trains on."""
    n = features.num_items + 1
    count = np.bincount(fit["item_idx"].to_numpy(), minlength=n)
    users = np.bincount(fit.drop_duplicates(["user_idx", "item_idx"])["item_idx"].to_numpy(), minlength=n)
    count[0] = users[0] = 0
    return dataclasses.replace(
        features,
        is_cold=torch.from_numpy(count == 0),
        train_count=torch.from_numpy(count.astype(np.int64)),
        train_users=torch.from_numpy(users.astype(np.int64)),
    )


def _pad_groups_full(code: np.ndarray, values: np.ndarray, n_groups: int, width: int, align: str) -> np.ndarray:
    """Like :func:`_pad_groups` for unsorted codes, with empty groups kept as all-padding rows."""
    order = np.argsort(code, kind="stable")  # stable: keeps time order within a user
    out = np.zeros((n_groups, width), dtype=np.int64)
    if len(code):
        sub = _pad_groups(code[order], values[order], width, align)
        out[: len(sub)] = sub
    return out
