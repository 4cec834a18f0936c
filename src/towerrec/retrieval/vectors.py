"""Synthetic catalogues for the index and serving benchmarks: random and clustered unit vectors.

Random unit vectors in 64-d have no structure, the hardest case for every ANN index and unlike real
item embeddings, which cluster. The clustered catalogue is a mixture of Gaussian clusters on the
sphere (cluster sizes drawn from a Zipf-like law, as categories in a shop are).
"""

from __future__ import annotations

import numpy as np

from towerrec.retrieval.index import normalized


def random_unit(n: int, d: int, seed: int = 0, chunk: int = 1_000_000) -> np.ndarray:
    """``(n, d)`` float32 unit vectors, uniform on the sphere (generated in chunks: no float64 copy)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        out[start : start + chunk] = normalized(rng.standard_normal((min(chunk, n - start), d), dtype=np.float32))
    return out


def clustered_unit(
    n: int, d: int, clusters: int = 0, spread: float = 0.5, seed: int = 0, chunk: int = 1_000_000
) -> np.ndarray:
    """``(n, d)`` float32 unit vectors around ``clusters`` random centres.

    Args:
        clusters: Gaussian clusters; 0 picks ``sqrt(n)``.
        spread: the noise norm relative to the centre's (0.5: about 27 degrees off the centre).
    """
    rng = np.random.default_rng(seed)
    clusters = clusters or max(1, round(np.sqrt(n)))
    centres = normalized(rng.standard_normal((clusters, d), dtype=np.float32))
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    weights /= weights.sum()
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.choice(clusters, m, p=weights)
        noise = rng.standard_normal((m, d), dtype=np.float32) * np.float32(spread / np.sqrt(d))
        out[start : start + m] = normalized(centres[which] + noise)
    return out
