"""The towers' dropout: torch's mask by default (earlier runs repeat), or the cheaper ``bits`` mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from towerrec.models.components import sequence_encoders
from towerrec.models.components.dropout import Dropout, dropout, set_dropout_mask
from towerrec.models.components.sequence_encoders import CausalTransformerEncoder


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_bits_mask_keeps_one_minus_p_and_scales_the_kept_values(p):
    x = torch.ones(1_000_003)  # not a multiple of 4: the last draw is cut
    torch.manual_seed(0)
    y = dropout(x, p, mask="bits")
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.002  # 1M Bernoulli draws: sd 0.0005
    # Each of the four 16-bit numbers of a draw too (a plain int64 random_() never sets the top bit).
    lanes = kept[: len(x) // 4 * 4].view(-1, 4).float().mean(0)
    assert (lanes - (1 - p)).abs().max().item() < 0.004, lanes
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    torch.manual_seed(0)
    assert torch.equal(dropout(x, p, mask="bits"), y)  # seeded: the same mask again
    assert not torch.equal(dropout(x, p, mask="bits"), y)  # the generator moved on: another mask
    # Independent elements: neighbours in one 64-bit draw are dropped together no more than chance says.
    pair = (~kept[:-1:2] & ~kept[1::2]).float().mean().item()
    assert abs(pair - p * p) < 0.003


def test_gradient_flows_through_the_kept_elements_only():
    x = torch.randn(64, 30, 16, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.3, mask="bits")
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.7)


def test_torch_mask_is_torchs_dropout_draw_for_draw_and_eval_is_the_identity():
    x = torch.randn(32, 50)
    module = Dropout(0.2)
    torch.manual_seed(3)
    ours = module(x)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.2, True))  # the default: runs published before repeat
    module.eval()
    assert module(x) is x
    module.dropout_mask = "bits"
    assert module(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_set_dropout_mask_reaches_every_dropout_and_the_attention():
    encoder = CausalTransformerEncoder(dim=16, num_layers=2, num_heads=2, max_len=8, dropout=0.2)
    set_dropout_mask(encoder, "bits")
    masks = [m.dropout_mask for m in encoder.modules() if hasattr(m, "dropout_mask")]
    assert len(masks) == 1 + 2 * 3 and set(masks) == {"bits"}  # input, and per block: attention, ff, residual
    with pytest.raises(ValueError, match="dropout_mask must be one of torch, bits"):
        set_dropout_mask(encoder, "fast")


def test_written_out_attention_is_sdpas_attention(monkeypatch):
    """With ``bits`` on the CPU the attention is written out to put the mask on its weights: without
    the mask it is the same attention as ``scaled_dot_product_attention``."""
    torch.manual_seed(0)
    encoder = CausalTransformerEncoder(dim=16, num_layers=2, num_heads=2, max_len=8, dropout=0.2)
    x, pad = torch.randn(4, 8, 16), torch.zeros(4, 8, dtype=torch.bool)
    pad[0, :3] = True
    encoder.eval()
    reference = encoder(x, pad)
    set_dropout_mask(encoder, "bits")
    encoder.train()
    for m in encoder.modules():
        if isinstance(m, Dropout):
            m.p = 0.0
    calls = []
    monkeypatch.setattr(sequence_encoders, "dropout", lambda w, p, mask: calls.append(mask) or w)
    torch.testing.assert_close(encoder(x, pad), reference)
    assert calls == ["bits", "bits"]  # the written-out path ran, once per block


def test_step_seed_gives_each_rank_its_own_stream_and_rank_0_the_one_process_one():
    """DDP ranks draw their own dropout masks and negatives; one process keeps the stream it always had."""
    from types import SimpleNamespace

    from towerrec.models.callbacks import StepSeed

    def draw(step: int, rank: int) -> torch.Tensor:
        StepSeed(seed=42).on_train_batch_start(SimpleNamespace(global_step=step, global_rank=rank), None, None, 0)
        return torch.rand(4)

    torch.manual_seed((42 * 1_000_003 + 7) % 2**32)
    expected = torch.rand(4)
    assert torch.equal(draw(7, 0), expected)  # the formula of earlier versions: one-process runs repeat
    assert torch.equal(draw(7, 1), draw(7, 1)) and not torch.equal(draw(7, 1), draw(7, 0))
    assert not torch.equal(draw(8, 0), draw(7, 0))
