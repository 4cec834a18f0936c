"""``towerrec.fileio.load_npy``: what ``np.load`` returns, from any number of threads at once."""

from __future__ import annotations

import threading

import numpy as np

from towerrec.fileio import load_npy


def test_load_npy_reads_what_np_load_reads(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "a.npy", values)
    whole = load_npy(tmp_path / "a.npy")
    assert type(whole) is np.ndarray and whole.dtype == np.float32 and np.array_equal(whole, values)
    whole[0, 0] = -1  # an in-memory copy: the file is untouched
    assert np.load(tmp_path / "a.npy")[0, 0] == 0
    mapped = load_npy(tmp_path / "a.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, values)


def test_load_npy_from_many_threads_at_once(tmp_path):
    """A server reloads an export in one thread while others load files: every load answers (the
    headers are parsed under one lock; CPython 3.11 once raised SystemError for two at once here)."""
    np.save(tmp_path / "a.npy", np.ones((5, 2), dtype=np.int64))
    errors, loaded = [], []

    def work() -> None:
        try:
            for _ in range(200):
                loaded.append(int(load_npy(tmp_path / "a.npy", mmap_mode="r").sum()))
        except Exception as err:  # noqa: BLE001 - any failure is the test's finding
            errors.append(repr(err))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and loaded == [10] * 1600
