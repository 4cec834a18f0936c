"""An on-disk cache for per-item features of a frozen encoder, keyed by what determines them.

A frozen backbone's features depend only on its weights, its preprocessing and the images it reads,
so they are computed once and reused by every later run, fold and checkpoint reload: the key holds
the SHA-256 of the backbone's weights and of the image array, not a run or a data split. A file
lock lets two processes that want the same features compute them once.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import filelock
import numpy as np
import torch
from torch import Tensor, nn

from towerrec.fileio import load_npy, sha256_of, text_sha256

log = logging.getLogger(__name__)

#: Bump when the cached arrays' meaning changes (a change in how features are computed).
CACHE_VERSION = 1
_ROWS = 2048


def tensor_sha256(x: Tensor) -> str:
    """SHA-256 of a tensor's bytes (moved to the CPU in row blocks, so a memory map is read, not copied)."""
    x = x.reshape(1) if x.dim() == 0 else x
    head = [f"{x.dtype}{tuple(x.shape)}".encode()]
    # Row blocks, hashed through their buffers: a memory map is read, not copied.
    blocks = (x[i : i + _ROWS].detach().cpu().contiguous().numpy() for i in range(0, len(x), _ROWS))
    return sha256_of(itertools.chain(head, blocks))


def module_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, by name: its weights, whatever file they came from.

    Batch-norm step counters are left out: they do not change what a frozen (eval-mode) network computes.
    """
    return sha256_of(
        f"{name}{tensor_sha256(value)}".encode()
        for name, value in sorted(module.state_dict().items())
        if not name.endswith("num_batches_tracked")
    )


def cached_features(folder: str | os.PathLike, name: str, key: dict, compute: Callable[[], Tensor]) -> Tensor:
    """``compute()`` once for ``key``; later calls with the same key read it back from ``folder``.

    Args:
        folder: the cache folder (created when missing).
        name: a readable file-name prefix, e.g. the encoder's name.
        key: plain JSON values that determine the result; stored beside it in a sidecar JSON.
        compute: returns the ``(rows, dim)`` float tensor to cache.

    Returns:
        The float32 CPU tensor, computed or read.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = text_sha256(json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True))[:16]
    path = folder / f"{name}-{digest}.npy"
    sidecar = path.with_suffix(".json")
    with filelock.FileLock(str(path) + ".lock"):
        if path.is_file() and sidecar.is_file():
            meta = json.loads(sidecar.read_text())
            if meta.get("key") == key:
                log.info("%s: frozen features read from the cache %s", name, path)
                return torch.from_numpy(load_npy(path))
        t0 = time.perf_counter()
        values = compute().detach().float().cpu()
        seconds = time.perf_counter() - t0
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npy")
        np.save(tmp, values.numpy())
        os.replace(tmp, path)  # a reader never sees a partial file
        meta = {"key": key, "shape": list(values.shape), "seconds": round(seconds, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        sidecar.write_text(json.dumps(meta, indent=2))
        log.info("%s: frozen features of %d items computed in %.1f s, cached in %s", name, len(values), seconds, path)
        return values
