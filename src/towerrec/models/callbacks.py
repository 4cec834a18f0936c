"""Training callbacks of the project (the rest are Lightning's own)."""

from __future__ import annotations

import lightning as L


class EpochSeed(L.Callback):
    """Reseed every random generator at the start of each training epoch from ``(seed, epoch)``.

    Shuffling, dropout, ID dropout and uniform negatives then depend only on the epoch, so a run
    resumed from a checkpoint at an epoch boundary repeats the uninterrupted run exactly.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(self.seed * 1000 + trainer.current_epoch, workers=True, verbose=False)
