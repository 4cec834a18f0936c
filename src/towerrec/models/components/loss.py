"""Sampled softmax over in-batch (and optional uniform) negatives with logQ correction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SampledSoftmaxLoss(nn.Module):
    """Cross-entropy of each query against a shared candidate set.

    The candidates are the distinct items of the batch plus, optionally, ``num_uniform_negatives``
    items drawn uniformly from the whole catalog (never-bought items included). Popular items are
    over-represented among in-batch candidates; the logQ correction subtracts the log of each
    candidate's expected count, ``log(P * freq_i + M / N)``, from its logit (Yi et al., 2019).
    Candidates equal to a query's positive other than the positive's own column (accidental hits),
    and invalid candidates (padding), are masked out.

    Args:
        temperature: logits are ``q . c / temperature``.
        logq_correction: subtract the log expected candidate count.
        num_uniform_negatives: uniform catalog negatives per batch (0 = in-batch only).
    """

    def __init__(self, temperature: float = 0.05, logq_correction: bool = True, num_uniform_negatives: int = 0) -> None:
        super().__init__()
        self.temperature = temperature
        self.logq_correction = logq_correction
        self.num_uniform_negatives = num_uniform_negatives

    def candidate_log_q(self, item_freq: Tensor, n_queries: int, n_items: int) -> Tensor:
        """``log`` of the expected number of times each candidate is drawn. ``item_freq`` sums to 1."""
        expected = n_queries * item_freq + self.num_uniform_negatives / max(n_items, 1)
        return torch.log(expected.clamp(min=1e-12))

    def forward(
        self,
        query: Tensor,
        candidates: Tensor,
        positive: Tensor,
        candidate_ids: Tensor,
        candidate_log_q: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: (P, D) user embeddings, one per supervised position.
            candidates: (C, D) candidate item embeddings.
            positive: (P,) column of each query's positive in ``candidates``.
            candidate_ids: (C,) item ids of the candidates (0 = padding, masked).
            candidate_log_q: (C,) log expected counts, used when ``logq_correction``.
        """
        logits = query @ candidates.T / self.temperature  # (P, C)
        if self.logq_correction and candidate_log_q is not None:
            logits = logits - candidate_log_q.unsqueeze(0)
        pos_ids = candidate_ids[positive]  # (P,)
        accidental = candidate_ids.unsqueeze(0) == pos_ids.unsqueeze(1)  # (P, C)
        accidental[torch.arange(len(positive), device=positive.device), positive] = False
        mask = accidental | (candidate_ids == 0).unsqueeze(0)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
        return F.cross_entropy(logits.float(), positive)
