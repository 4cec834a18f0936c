"""The interactions as flat, memory-mappable sequences (in the spirit of nanoGPT's token files).

``towerrec-prepare`` streams ``interactions.parquet`` (sorted by user, then time) into::

    seq_items.npy       (N,) int32   item ids of all interactions, user by user, oldest first
    seq_split.npy       (N,) int8    split code per position: 0 train, 1 val, 2 test
    seq_offsets.npy     (U + 2,) int64   user ``u`` holds positions ``offsets[u]:offsets[u + 1]``
                                         (``u`` from 1; user 0 is padding and holds none)
    seq_split_ends.npy  (U + 1, 3) int64 where user ``u``'s train, val and test positions end

Within a user the splits follow in time order (train, then val, then test: both split methods cut
time), so split ``k`` of user ``u`` is the slice ``ends[u, k - 1]:ends[u, k]`` (``offsets[u]`` for
``k = 0``), and the history of a split is a prefix of the user's sequence. The DataModule maps these
files (:func:`load_sequences`); nothing that grows with the number of interactions is read into a
process, and the processes of one machine share the pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from towerrec.data.schema import DataError
from towerrec.fileio import load_npy

#: Split name -> the code stored in ``seq_split.npy``.
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
FILES = ("seq_items.npy", "seq_split.npy", "seq_offsets.npy", "seq_split_ends.npy")
_BATCH_ROWS = 1 << 20


def _split_codes(column: pa.Array, path: Path) -> np.ndarray:
    """``split`` strings (plain or dictionary-encoded) -> int8 codes; a one-line error for others."""
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    if column.null_count:
        raise DataError(f"{path}: column split has {column.null_count} empty values")
    names = column.dictionary.to_pylist()
    unknown = sorted(set(names) - set(SPLIT_CODES))
    if unknown:
        raise DataError(f"{path}: column split has {unknown}, expected train, val or test")
    lut = np.array([SPLIT_CODES[n] for n in names], dtype=np.int8)
    return lut[column.indices.to_numpy(zero_copy_only=False)]


def write_sequences(interactions_parquet: Path, out_dir: Path) -> dict:
    """Stream ``interactions_parquet`` (sorted by user, then time) into the ``seq_*.npy`` files of ``out_dir``.

    Reads about a million rows at a time, so memory stays flat in the number of interactions (the
    per-user arrays grow with the users).

    Returns:
        The manifest's ``sequences`` entry: the files, positions, users and the split codes.

    Raises:
        DataError: rows not sorted by user, a user whose splits are not in time order (train, val,
            test), an id out of range or an unknown split name.
    """
    path, out = Path(interactions_parquet), Path(out_dir)
    pf = pq.ParquetFile(path)
    n = pf.metadata.num_rows
    # Plain appends to .npy files, not a writable memory map: a map's written pages would stay in this
    # process's resident memory until the kernel writes them back.
    items = _npy_writer(out / "seq_items.npy", np.int32, n)
    split = _npy_writer(out / "seq_split.npy", np.int8, n)
    # (user, split) -> positions: sized once from the file's statistics where it has them (growing it
    # by doubling held up to 3x the final array at 5M users), else grown as users appear.
    top = min(_max_user(pf) or 0, n)  # ids are dense: at most one user per row
    counts = np.zeros((max(top, 1023) + 1, 3), dtype=np.int64)
    pos, last_user, last_code, max_item = 0, 0, 0, 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=["user_idx", "item_idx", "split"]):
        user = batch.column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        item = batch.column("item_idx").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        code = _split_codes(batch.column("split"), path)
        m = len(user)
        if m == 0:
            continue
        if user.min() < 1 or item.min() < 1 or item.max() >= 2**31:
            raise DataError(f"{path}: user_idx and item_idx must be ids from 1 (0 is padding) below 2**31")
        prev_user = np.r_[last_user, user[:-1]]
        prev_code = np.r_[last_code, code[:-1]]
        if (user < prev_user).any():
            row = pos + int(np.flatnonzero(user < prev_user)[0])
            raise DataError(f"{path}: row {row}: interactions are not sorted by user_idx")
        if ((user == prev_user) & (code < prev_code)).any():
            row = pos + int(np.flatnonzero((user == prev_user) & (code < prev_code))[0])
            raise DataError(f"{path}: row {row}: user {int(user[row - pos])}'s splits are not in time order (train, val, test)")
        top = int(user[-1])
        if top >= len(counts):
            counts = np.concatenate([counts, np.zeros((max(top + 1, 2 * len(counts)) - len(counts), 3), np.int64)])
        _add_counts(counts, user, code)
        items.write(item.astype(np.int32).tobytes())
        split.write(code.astype(np.int8).tobytes())
        pos += m
        last_user, last_code, max_item = top, int(code[-1]), max(max_item, int(item.max()))
    items.close()
    split.close()
    # Arrow's allocator keeps what the batches freed (117 MB at 10M rows; RSS stayed 675 MB higher after
    # the 100M pass); hand it back before the caller's next step.
    pa.default_memory_pool().release_unused()
    n_users = last_user
    counts = counts[: n_users + 1]
    offsets = np.zeros(n_users + 2, dtype=np.int64)
    np.cumsum(counts.sum(axis=1), out=offsets[1:])
    # The ends in place of the counts (no (U + 1, 3) temporaries: 120 MB each at 5M users).
    counts[:, 1] += counts[:, 0]
    counts[:, 2] += counts[:, 1]
    counts += offsets[:-1, None]
    ends = counts  # (U + 1, 3)
    np.save(out / "seq_offsets.npy", offsets)
    np.save(out / "seq_split_ends.npy", ends)
    return {
        "files": list(FILES),
        "positions": int(n),
        "users": int(n_users),
        "max_item": int(max_item),
        "split_codes": dict(SPLIT_CODES),
    }


def _npy_writer(path: Path, dtype: type, n: int):
    """An open file holding a ``.npy`` header for ``n`` values of ``dtype``; the caller writes the data."""
    f = open(path, "wb")  # closed by the caller once the data is written
    np.lib.format.write_array_header_2_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
    )
    return f


def _max_user(pf: pq.ParquetFile) -> int | None:
    """The largest ``user_idx`` by the file's row-group statistics, or None where a group has none."""
    meta, top = pf.metadata, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        cols = (group.column(j) for j in range(group.num_columns))
        col = next((c for c in cols if c.path_in_schema == "user_idx"), None)
        stats = None if col is None else col.statistics
        if stats is None or not stats.has_min_max:
            return None
        top = max(top, int(stats.max))
    return top


def _add_counts(counts: np.ndarray, user: np.ndarray, code: np.ndarray) -> None:
    """``counts[user, code] += 1`` for every row, with one bincount."""
    lo, hi = int(user[0]), int(user[-1]) + 1  # sorted: the batch's users are lo..hi-1
    flat = np.bincount((user - lo) * 3 + code, minlength=(hi - lo) * 3)
    counts[lo:hi] += flat.reshape(hi - lo, 3)


@dataclass(frozen=True)
class Sequences:
    """The memory-mapped ``seq_*`` arrays of one processed folder (see the module docstring)."""

    items: np.ndarray  # (N,) int32, memory-mapped
    split: np.ndarray  # (N,) int8, memory-mapped
    offsets: np.ndarray  # (U + 2,) int64
    ends: np.ndarray  # (U + 1, 3) int64

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 2

    def start(self) -> np.ndarray:
        """``(U + 1,)`` each user's first position."""
        return self.offsets[:-1]

    def end_of(self, splits: tuple[str, ...] | list[str]) -> np.ndarray:
        """``(U + 1,)`` where each user's positions of ``splits`` (a time-ordered prefix) end."""
        codes = sorted(SPLIT_CODES[s] for s in splits)
        if codes != list(range(len(codes))):
            raise ValueError(f"splits {list(splits)} are not a prefix of train, val, test")
        return self.ends[:, codes[-1]]

    def block(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(U + 1,)`` start and end of each user's positions of split ``name``."""
        k = SPLIT_CODES[name]
        lo = self.offsets[:-1] if k == 0 else self.ends[:, k - 1]
        return lo, self.ends[:, k]


def load_sequences(processed_dir: str | Path) -> Sequences:
    """Map the ``seq_*`` files of ``processed_dir`` (read-only; the item and split arrays stay on disk)."""
    d = Path(processed_dir)
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise DataError(f"{d}: no {missing[0]} (written by an older towerrec-prepare); run towerrec-prepare force=true")
    return Sequences(
        items=load_npy(d / "seq_items.npy", mmap_mode="r"),
        split=load_npy(d / "seq_split.npy", mmap_mode="r"),
        offsets=load_npy(d / "seq_offsets.npy", mmap_mode="r"),
        ends=load_npy(d / "seq_split_ends.npy", mmap_mode="r"),
    )


# ----------------------------------------------------------------------------- cutting rows out of the maps
def ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenated positions ``lo[i]:hi[i]`` of every row ``i``."""
    size = hi - lo
    return np.repeat(lo - np.r_[0, np.cumsum(size)[:-1]], size) + np.arange(int(size.sum()))


def last_items(items: np.ndarray, lo: np.ndarray, hi: np.ndarray, width: int) -> np.ndarray:
    """``(U, width)`` int64: each row's last ``width`` items of ``items[lo:hi]``, right-aligned, 0-padded."""
    pos = hi[:, None] - width + np.arange(width)
    valid = pos >= lo[:, None]
    return np.where(valid, items[np.where(valid, pos, 0)], 0).astype(np.int64)


def first_items(items: np.ndarray, lo: np.ndarray, hi: np.ndarray, width: int) -> np.ndarray:
    """``(U, width)`` int64: each row's first ``width`` items of ``items[lo:hi]``, left-aligned, 0-padded."""
    pos = lo[:, None] + np.arange(width)
    valid = pos < hi[:, None]
    return np.where(valid, items[np.where(valid, pos, 0)], 0).astype(np.int64)


def distinct_pairs(items: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distinct items of ``items[lo:hi]``, flat: ``(row, item)`` int64, rows in order and,
    within a row, items in order of first appearance."""
    size = hi - lo
    row = np.repeat(np.arange(len(lo)), size)
    item = np.asarray(items[ranges(lo, hi)]).astype(np.int64)
    key = row * (int(item.max(initial=0)) + 1) + item
    _, first = np.unique(key, return_index=True)
    first.sort()  # keeps rows in order, and within a row the order of first appearance
    return row[first], item[first]


def distinct_items(items: np.ndarray, lo: np.ndarray, hi: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distinct items of ``items[lo:hi]`` in order of first appearance, at most ``cap``.

    Returns:
        ``(U, W)`` int64 left-aligned and 0-padded (``W`` the rows' widest, at most ``cap``, at least 1),
        and ``(U,)`` the number of distinct items of each row before the cap.
    """
    row, item = distinct_pairs(items, lo, hi)
    n_t = np.bincount(row, minlength=len(lo))
    width = int(min(max(n_t.max(initial=1), 1), cap))
    slot = np.arange(len(row)) - np.repeat(np.cumsum(n_t) - n_t, n_t)  # position within the row
    keep = slot < width
    out = np.zeros((len(lo), width), dtype=np.int64)
    out[row[keep], slot[keep]] = item[keep]
    return out, n_t


def read_slice(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]`` as a new array; from a memory map's file with a plain read.

    A pass over a whole map would leave every page it read resident in this process (400 MB for the
    items of 100M interactions), though a read of each part once needs none of them afterwards.
    """
    if isinstance(array, np.memmap) and array.filename and array.ndim == 1:
        with open(array.filename, "rb") as f:
            return np.fromfile(f, dtype=array.dtype, count=stop - start, offset=array.offset + start * array.itemsize)
    return np.array(array[start:stop])


def train_item_counts(seq: Sequences, n_items: int, chunk_positions: int = _BATCH_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Per item, its training purchases and its distinct training buyers, read a few users at a time.

    Returns:
        Two ``(n_items + 1,)`` int64 arrays indexed by item id (0, the padding item, holds none).
    """
    lo_all, hi_all = (np.asarray(a) for a in seq.block("train"))
    sizes = hi_all - lo_all
    # Chunks of whole users, each starting at the user who holds position 0, chunk_positions, ...
    starts = np.searchsorted(np.cumsum(sizes), np.arange(0, int(sizes.sum()), chunk_positions), side="right")
    purchases = np.zeros(n_items + 1, dtype=np.int64)
    buyers = np.zeros(n_items + 1, dtype=np.int64)
    for u0, u1 in zip(starts, np.r_[starts[1:], len(sizes)].astype(np.int64), strict=True):
        if u1 <= u0:
            continue
        first, last = int(lo_all[u0]), int(hi_all[u1 - 1])
        part = read_slice(seq.items, first, last)
        lo, hi = lo_all[u0:u1] - first, hi_all[u0:u1] - first
        purchases += np.bincount(part[ranges(lo, hi)], minlength=n_items + 1)
        buyers += np.bincount(distinct_pairs(part, lo, hi)[1], minlength=n_items + 1)
    return purchases, buyers
