import math

import torch

from towerrec.models.components.loss import SampledSoftmaxLoss


def test_loss_matches_hand_computed_value():
    # Two queries, three candidates (ids 5, 7, 9), D = 2, temperature 0.5, no logQ.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    loss = SampledSoftmaxLoss(temperature=0.5, logq_correction=False)
    value = loss(q, c, positive=torch.tensor([0, 2]), candidate_ids=torch.tensor([5, 7, 9]))
    # query 0 logits: [2, 0, 1.2] -> -log(e^2 / (e^2 + e^0 + e^1.2)); query 1 logits: [0, 2, 1.6], positive 1.6
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1.2)))
    l1 = -math.log(math.exp(1.6) / (1 + math.exp(2) + math.exp(1.6)))
    assert math.isclose(value.item(), (l0 + l1) / 2, rel_tol=1e-6)


def test_logq_correction_is_subtracted():
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    log_q = torch.tensor([math.log(0.5), math.log(0.25)])
    loss = SampledSoftmaxLoss(temperature=1.0, logq_correction=True)
    value = loss(q, c, torch.tensor([0]), torch.tensor([1, 2]), log_q)
    a, b = 1 - math.log(0.5), 0 - math.log(0.25)
    assert math.isclose(value.item(), -math.log(math.exp(a) / (math.exp(a) + math.exp(b))), rel_tol=1e-6)


def test_accidental_hits_and_padding_are_masked():
    # Candidate 1 repeats the positive's id (an accidental hit), candidate 2 is padding:
    # only candidate 3 is a negative.
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = SampledSoftmaxLoss(temperature=1.0, logq_correction=False)
    value = loss(q, c, torch.tensor([0]), torch.tensor([4, 4, 0, 8]))
    expected = -math.log(math.e / (math.e + 1.0))
    assert math.isclose(value.item(), expected, rel_tol=1e-6)


def test_candidate_log_q_counts_uniform_negatives():
    loss = SampledSoftmaxLoss(num_uniform_negatives=10)
    freq = torch.tensor([0.0, 0.5, 0.5, 0.0])
    lq = loss.candidate_log_q(freq, n_queries=4, n_items=3)
    # expected count = 4 * freq + 10 / 3; a never-bought item only comes from the uniform draw
    assert torch.allclose(lq.exp(), torch.tensor([10 / 3, 2 + 10 / 3, 2 + 10 / 3, 10 / 3]))
