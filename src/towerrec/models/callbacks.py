"""Training callbacks of the project (the rest are Lightning's own)."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class StepSeed(L.Callback):
    """Reseed the random generators before each training step from ``(seed, global_step, rank)``.

    Dropout, ID dropout and uniform negatives then depend only on the step, so a run resumed
    from a checkpoint repeats the uninterrupted run exactly (the batch order is seeded by epoch
    in the DataModule's sampler). Each DDP rank gets its own stream (rank 0's is the one-process
    stream), so the ranks' parts of a global batch do not share their dropout masks and negatives.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        s = (self.seed * 1_000_003 + trainer.global_step + trainer.global_rank * 7_919_993) % (2**32)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
