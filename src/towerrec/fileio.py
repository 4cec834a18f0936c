"""File helpers every step shares: hashing, fingerprints, atomic writes, JSON and markdown tables.

Each rule lives here once, so the processed-data manifest, the export manifest and the reports hash,
fingerprint and write files the same way. This module imports no torch and no Lightning: retrieval
loads it to verify an export without the training stack.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_BLOCK = 1 << 20
_NPY_HEADER_LOCK = threading.Lock()


def sha256_of(blocks: Iterable[bytes | memoryview]) -> str:
    """SHA-256 of a stream of byte blocks (or buffers, hashed without a copy)."""
    h = hashlib.sha256()
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's contents, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return sha256_of(iter(lambda: f.read(_BLOCK), b""))


def text_sha256(text: str) -> str:
    """SHA-256 of a string's UTF-8 bytes (canonical JSON, config blobs)."""
    return sha256_of([text.encode()])


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Size and SHA-256 of a file's contents: ``{"bytes": int, "sha256": str}``."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def _walk(folder: str, rel: str = "") -> Iterator[tuple[str, os.DirEntry]]:
    with os.scandir(folder) as it:
        for entry in it:
            name = f"{rel}{entry.name}"
            if entry.is_dir(follow_symlinks=True):
                yield from _walk(entry.path, f"{name}/")
            elif entry.is_file(follow_symlinks=True):
                yield name, entry


def tree_fingerprint(folder: str | os.PathLike, pattern: str = "*") -> dict:
    """Fingerprint a folder tree from its listing, without reading file contents.

    Hashes the sorted ``(relative name, size, mtime_ns)`` lines of the files whose name matches
    ``pattern`` (``fnmatch`` on the file name, e.g. ``"*.jpg"``), at any depth. It changes when a file
    is added, removed, resized or touched, which is what staleness checks need, at the cost of a
    directory listing.

    Returns:
        ``{"exists": bool, "files": int, "bytes": int, "sha256": str}``; zero files for an absent folder.
    """
    folder = os.fspath(folder)
    rows = []
    exists = os.path.isdir(folder)
    if exists:
        for name, entry in _walk(folder):
            if fnmatch.fnmatch(entry.name, pattern):
                st = entry.stat()
                rows.append((name, st.st_size, st.st_mtime_ns))
    rows.sort()
    digest = sha256_of(f"{name}\t{size}\t{mtime}\n".encode() for name, size, mtime in rows)
    return {"exists": exists, "files": len(rows), "bytes": sum(r[1] for r in rows), "sha256": digest}


def folder_files(folder: str | os.PathLike, names: list[str] | None = None) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` for the named files of ``folder`` (all regular files when None)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {name: file_fingerprint(folder / name) for name in names}


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` folder: each rename is atomic, so a reader sees the old
    complete folder, then (after a moment with none) the new one, never a partial one."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Write a folder atomically: yield a fresh temporary folder beside ``out``, rename it into place
    when the block finishes, remove it when the block raises.

    The temporary name is unique per process and call, so concurrent writers never share one. Writers
    that must not both build the same folder should also hold a lock (see
    :func:`towerrec.data.build.ensure_prepared`).

    Args:
        out: the folder to (re)place.
        overwrite: replace an existing ``out``; otherwise raise ``FileExistsError`` before writing.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=true to replace it")
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def json_safe(value: Any) -> Any:
    """``value`` with every float NaN (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(path: str | os.PathLike, value: Any, indent: int = 2) -> Path:
    """Write ``value`` as JSON with NaN as null (strict JSON), through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(json_safe(value), indent=indent, default=str, allow_nan=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def markdown_table(
    rows: pd.DataFrame | list[dict], floatfmt: str = ".4f", missing: str = "–", numparse: bool = True
) -> str:
    """A GitHub markdown table (``DataFrame.to_markdown``), floats with ``floatfmt``, NaN as ``missing``.

    Args:
        numparse: align and format number-like strings as numbers; False keeps every string as written.
    """
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    df = df.astype(object).where(df.notna(), None)  # tabulate writes None as ``missing``, NaN as "nan"
    return df.to_markdown(index=False, floatfmt=floatfmt, missingval=missing, disable_numparse=not numparse)


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of one ``.npy`` file, safe to call from several threads at once.

    ``np.load`` parses the file's header with ``ast.literal_eval``, and CPython 3.11's compiler is not
    safe for two threads at once: a server thread reloading an export while another thread loaded one
    failed with ``SystemError: AST constructor recursion depth mismatch``. Headers are read here under
    one process-wide lock, as a memory map; without ``mmap_mode`` the data is then read outside it.
    """
    with _NPY_HEADER_LOCK:
        array = np.load(path, mmap_mode=mmap_mode or "r")
    return array if mmap_mode else np.array(array)
