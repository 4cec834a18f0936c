"""Real ``towerrec-train`` processes: two seeded runs write identical metrics and weights, and a run
killed with SIGKILL mid-epoch and resumed from ``last.ckpt`` (the epoch's start) or from ``step.ckpt``
(its next batch) ends with the metrics of the uninterrupted run.

The equality means something: at this size, with ``trainer.deterministic=false``, the training
step's gradients differ from one repeat to the next in one process, and two runs end with different
weights (both shown below).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATA, compose_cfg

from towerrec.commands.train import build
from towerrec.data.build import ensure_prepared
from towerrec.evaluation.results import read_results

#: Tiny data, but batches large enough (64 windows x 20 positions x 32 dims) that the backward of
#: the history gather runs on both threads, where its order is not fixed without
#: ``trainer.deterministic`` (whether two such runs then differ depends on thread timing).
ARGS = [
    *TINY_DATA,
    "data.source.n_interactions=6000",  # about 5 batches per epoch, so a kill can land inside one
    "model.dim=32",
    "model.item_tower.image_encoder.channels=4",
    "model.loss.num_uniform_negatives=16",
    "datamodule.max_len=20",
    "datamodule.batch_size=64",
    "trainer.max_epochs=3",
    "+trainer.limit_val_batches=2",
    "callbacks.early_stopping.patience=99",
    "callbacks.progress_bar.refresh_rate=1",  # the kill below watches the progress bar
    "logger=none",
]
TIMEOUT = 1200  # seconds per process; generous, for loaded shared machines


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """Prepared once in this process, so the children below never race on it."""
    folder = tmp_path_factory.mktemp("det") / "synthetic"
    ensure_prepared(compose_cfg("train", [*ARGS, f"data.processed_dir={folder}"], folder.parent / "cfg").data, workers=0)
    return folder


def _start(processed: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "towerrec.commands.train", *ARGS, f"data.processed_dir={processed}", f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)  # the bar is on stdout


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


def _metrics(run_dir: Path) -> dict:
    """What the comparisons need of a run's results record."""
    record = read_results(run_dir / "metrics.json")
    return {"test": record.scores(), "val": record.val, "best_checkpoint": record.run["best_checkpoint"]}


def _weights(metrics: dict) -> dict[str, torch.Tensor]:
    return torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]


def _same_weights(a: dict, b: dict) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _pair(processed: Path, root: Path, *extra: str) -> tuple[dict, dict]:
    """Two uninterrupted runs of one command, run side by side."""
    procs = [_start(processed, root / name, *extra) for name in ("a", "b")]
    for proc in procs:
        _finish(proc)
    return _metrics(root / "a"), _metrics(root / "b")


@pytest.fixture(scope="module")
def reference(processed, tmp_path_factory) -> tuple[dict, dict]:
    return _pair(processed, tmp_path_factory.mktemp("ref"))


def _step_gradients(cfg, repeats: int) -> int:
    """How many distinct item-tower gradients ``repeats`` backward passes of one training batch give."""
    dm, model, _ = build(cfg)
    model.attach_features(dm.model_features)  # what setup() does under a Trainer
    batch = next(iter(dm.train_dataloader()))
    seen = set()
    for _ in range(repeats):
        torch.manual_seed(0)  # the same uniform negatives and dropout each time
        model.zero_grad()
        model.training_step(batch, 0).backward()
        seen.add(b"".join(p.grad.numpy().tobytes() for p in model.item_tower.parameters() if p.grad is not None))
    return len(seen)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the CPU gather's backward is ordered anyway")
@pytest.mark.slow
def test_at_this_size_only_the_deterministic_setting_makes_a_training_step_repeatable(processed, tmp_path):
    cfg = compose_cfg("train", [*ARGS, f"data.processed_dir={processed}"], tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as training runs on a 2-core machine (other tests in this process may set 1)
    try:
        torch.use_deterministic_algorithms(False)
        assert _step_gradients(cfg, repeats=8) > 1  # the backward of hist_emb[inv] adds in thread order
        torch.use_deterministic_algorithms(True)  # what trainer.deterministic=true sets
        assert _step_gradients(cfg, repeats=8) == 1
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_seeded_runs_write_identical_metrics(reference):
    a, b = reference
    assert a["test"] == b["test"]  # every slice and metric, to the last digit
    assert a["val"] == b["val"]
    assert Path(a["best_checkpoint"]).name == Path(b["best_checkpoint"]).name
    assert _same_weights(a, b)  # every weight, to the last bit


@pytest.mark.slow
def test_without_the_deterministic_setting_two_runs_end_with_different_weights(processed, tmp_path):
    """The control: the same pair of runs with ``trainer.deterministic=false`` does not repeat."""
    a, b = _pair(processed, tmp_path, "trainer.deterministic=false")
    assert not _same_weights(a, b)


def _kill_mid_epoch(proc: subprocess.Popen, epoch: int, at_least: int = 1) -> tuple[int, int]:
    """Read the progress bar until training is inside ``epoch`` (``at_least`` batches done, not all), then SIGKILL."""
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    bar = re.compile(rb"Epoch %d:\s+\d+%%\|[^|]*\|\s*(\d+)/(\d+)" % epoch)
    seen = b""
    try:
        while chunk := proc.stdout.read1(4096):
            seen = seen[-4096:] + chunk
            done = [(int(a), int(b)) for a, b in bar.findall(seen)]
            if done and at_least <= done[-1][0] < done[-1][1]:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return done[-1]
    finally:
        watchdog.cancel()
    pytest.fail(f"the run ended before epoch {epoch} was under way: {seen.decode(errors='replace')[-2000:]}")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_metrics(processed, reference, tmp_path):
    run = tmp_path / "run"
    proc = _start(processed, run)
    step, total = _kill_mid_epoch(proc, epoch=1)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists()
    last = run / "checkpoints" / "last.ckpt"
    # The newest checkpoint is from the end of epoch 0: the killed epoch's steps are lost and replayed.
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0, (step, total)

    resumed = _start(processed, run, f"ckpt_path={last}")  # the README's resume line: same run folder
    _finish(resumed)
    full, _ = reference
    got = _metrics(run)
    assert got["test"] == full["test"]
    assert got["val"] == full["val"]
    assert Path(got["best_checkpoint"]).name == Path(full["best_checkpoint"]).name


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_the_step_checkpoint_at_the_next_batch(processed, reference, tmp_path):
    run = tmp_path / "run"
    every_step = "callbacks.step_checkpoint.every_n_train_steps=1"
    proc = _start(processed, run, every_step)
    step, total = _kill_mid_epoch(proc, epoch=1, at_least=2)
    assert proc.returncode == -signal.SIGKILL
    ckpt = run / "checkpoints" / "step.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    (loader,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    # Saved inside epoch 1, after some of its batches and before its last: the sampler's place.
    assert state["epoch"] == 1 and loader["epoch"] == 1 and 0 < loader["batches"] < total, (loader, step, total)
    assert state["global_step"] == total + loader["batches"]

    resumed = _start(processed, run, every_step, f"ckpt_path={ckpt}")
    out, _ = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, out.decode(errors="replace")[-3000:]
    assert b"not resumable" not in out  # Lightning's warning for a loader that restarts its epoch
    full, _ = reference
    got = _metrics(run)
    assert got["test"] == full["test"]  # to the last digit
    assert got["val"] == full["val"]
    assert Path(got["best_checkpoint"]).name == Path(full["best_checkpoint"]).name
