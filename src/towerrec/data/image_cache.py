"""Decode and resize every item image once into a memory-mapped uint8 array.

Training reads this array; no JPEG is decoded per batch. Row 0 is the padding item.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from towerrec.fileio import load_npy

log = logging.getLogger(__name__)

# Fashion photos sit on white; padding to a square keeps the garment's aspect ratio.
PAD_COLOUR = (255, 255, 255)


def _decode(path: str, size: int) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        img = img.convert("RGB")
        img = ImageOps.pad(img, (size, size), method=Image.Resampling.BILINEAR, color=PAD_COLOUR)
        return np.asarray(img, dtype=np.uint8)


def _decode_chunk(args: tuple[str, int, list[tuple[int, str]], int]) -> tuple[list[int], list[int]]:
    out_path, n_rows, jobs, size = args
    arr = np.lib.format.open_memmap(out_path, mode="r+")
    ok, corrupt = [], []
    for row, path in jobs:
        try:
            arr[row] = _decode(path, size)
            ok.append(row)
        except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for broken files
            log.warning("corrupt image %s: %s", path, err)
            corrupt.append(row)
    arr.flush()
    del arr
    return ok, corrupt


def build_image_cache(
    image_paths: list[str | None],
    out_path: str | Path,
    size: int,
    workers: int = 2,
    images: np.ndarray | None = None,
) -> tuple[np.ndarray, Counter]:
    """Write ``images.npy`` of shape ``(len(image_paths) + 1, size, size, 3)``.

    Args:
        image_paths: one path (or None) per item, item ``i`` at row ``i + 1``.
        out_path: the ``.npy`` file to write.
        size: the square side in pixels.
        workers: decoding processes.
        images: in-memory images aligned with ``image_paths`` (used instead of files).

    Returns:
        The has-image mask (length ``n + 1``, row 0 False) and counts by reason:
        ``missing_file``, ``corrupt_file`` (each replaced by a blank placeholder) and ``no_image``.
    """
    n = len(image_paths)
    counts: Counter = Counter()
    arr = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(n + 1, size, size, 3))
    has_image = np.zeros(n + 1, dtype=bool)
    if images is not None:
        if images.shape[1:3] != (size, size):
            import torch
            import torch.nn.functional as F

            t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            images = t.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        arr[1:] = images
        has_image[1:] = True
        arr.flush()
        del arr
        return has_image, counts
    arr.flush()
    del arr

    jobs: list[tuple[int, str]] = []
    for i, p in enumerate(image_paths):
        if p is None or (isinstance(p, float) and np.isnan(p)) or p == "":
            counts["no_image"] += 1
        elif not Path(p).is_file():
            counts["missing_file"] += 1
        else:
            jobs.append((i + 1, str(p)))
    if counts["missing_file"]:
        log.warning("%d image files are missing: blank placeholders used", counts["missing_file"])
    n_chunks = max(1, workers * 8)
    chunks = [(str(out_path), n + 1, jobs[c::n_chunks], size) for c in range(n_chunks) if jobs[c::n_chunks]]
    if workers > 1 and len(jobs) > 256:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_decode_chunk, chunks))
    else:
        results = [_decode_chunk(c) for c in chunks]
    for ok, corrupt in results:
        has_image[ok] = True
        counts["corrupt_file"] += len(corrupt)
    if counts["corrupt_file"]:
        log.warning("%d image files are corrupt: blank placeholders used", counts["corrupt_file"])
    return has_image, counts


def load_image_cache(path: str | Path) -> np.ndarray:
    """Open ``images.npy`` memory-mapped, copy-on-write: pages are read from the file on demand and
    shared by every process that maps it; a write would stay private and never reach the file."""
    return load_npy(path, mmap_mode="c")
