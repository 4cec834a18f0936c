"""The training step: distinct items found on the host, the deterministic mode's cost, the GPU config."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from towerrec.commands.train import build


def _reference_loss(model, batch) -> torch.Tensor:
    """The step's loss written out without the distinct-item gather: every history slot through the
    item tower, the candidates looked up by id (eval mode: no dropout, so both are deterministic)."""
    inputs, targets = batch["inputs"], batch["targets"]
    h = model.queries(model.item_tower(inputs), inputs == 0)  # (B, L, D)
    valid = targets != 0
    ids = torch.unique(torch.cat([inputs.reshape(-1), targets.reshape(-1)]))
    positive = torch.searchsorted(ids, targets[valid])
    log_q = model.loss_fn.candidate_log_q(model.item_freq[ids], int(valid.sum()), len(model.item_tower.is_cold) - 1)
    return model.loss_fn(h[valid], model.item_tower(ids), positive, ids, log_q)


@pytest.fixture
def model_and_batch(tiny_train_cfg):
    dm, model, _ = build(tiny_train_cfg("model.loss.num_uniform_negatives=0"))
    model.attach_features(dm.model_features)
    model.log = lambda *args, **kwargs: None  # no trainer attached
    return model, next(iter(dm.train_dataloader()))


def test_the_step_on_host_found_items_equals_the_loss_written_out(model_and_batch):
    model, batch = model_and_batch
    model.eval()
    host = model.on_before_batch_transfer(batch, 0)
    assert {"items", "inverse", "supervised"} <= set(host)
    assert host["supervised"].numel() == int((batch["targets"] != 0).sum()) < batch["targets"].numel()
    expected = _reference_loss(model, batch)
    with torch.no_grad():
        assert torch.allclose(model.training_step(host, 0), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(model.training_step(batch, 0), expected, rtol=1e-5, atol=1e-6)  # found in the step


def test_host_found_items_give_the_same_training_gradients(model_and_batch):
    model, batch = model_and_batch
    model.train()
    grads = []
    for b in (batch, model.on_before_batch_transfer(batch, 0)):
        torch.manual_seed(0)  # the same dropout and ID dropout both times
        model.zero_grad()
        model.training_step(b, 0).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_batches_the_host_leaves_alone(tiny_train_cfg, model_and_batch):
    model, batch = model_and_batch
    val = {"history": batch["inputs"], "targets": batch["targets"]}
    assert model.on_before_batch_transfer(val, 0) is val  # evaluation batches
    dm, with_negatives, _ = build(tiny_train_cfg("model.loss.num_uniform_negatives=16"))
    assert with_negatives.on_before_batch_transfer(batch, 0) is batch  # negatives are drawn in the step


def test_deterministic_training_keeps_the_algorithms_but_skips_the_nan_fill(model_and_batch):
    model, _ = model_and_batch
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        model.setup("fit")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def test_gpu_trainer_runs_bf16_at_a_batch_of_at_least_1024(tmp_path):
    cfg = compose_cfg("train", ["trainer=gpu"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    assert cfg.datamodule.batch_size >= 1024
    cpu = compose_cfg("train", [], tmp_path)
    assert cpu.datamodule.batch_size < 1024 and cpu.trainer.accelerator == "cpu"
