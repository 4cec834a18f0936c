"""The benchmark scripts still run against the code they measure: each at a tiny size, in its own
process, printing its table. (bench_serve's tiny checkpoint once read the results record as a dict
and failed only when someone ran the 1M benchmark.) Sizes and timings are not checked here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TINY_DATA

from towerrec import PROJECT_ROOT

SCRIPTS = PROJECT_ROOT / "scripts"


def run_script(name: str, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_bench_eval_prints_score_topk_against_the_floor():
    out = run_script("bench_eval.py", "--sizes", "500:256", "--repeat", "1")
    assert "| 500 items" in out and "score_topk (users/s)" in out


@pytest.mark.slow  # about 20 s: a tiny shop prepared, then steps of the real model
def test_bench_train_prints_the_step_and_its_floor(tmp_path):
    out = run_script(
        "bench_train.py", "--configs", "synthetic", "--images", "trainable", "--skip-epoch", "--steps", "2",
        "--warmup", "1", "--processed-root", str(tmp_path), "--overrides", *TINY_DATA,
    )  # fmt: skip
    assert "| synthetic | trainable, floor |" in out and "step / floor = x" in out


@pytest.mark.slow  # about 15 s: a few small indexes built twice (project and raw FAISS)
def test_bench_index_prints_project_beside_raw_faiss():
    out = run_script("bench_index.py", "--n", "3000", "--queries", "50", "--single", "10", "--repeat", "1",
                     "--min-seconds", "0", "--configs", "flat", "ivf_flat")  # fmt: skip
    assert "flat" in out and "ivf_flat" in out and "|" in out


@pytest.mark.slow  # about a minute: a tiny checkpoint, a 3,000-vector export, a server under load
def test_bench_serve_runs_a_synthetic_export_end_to_end(tmp_path):
    out = run_script(
        "bench_serve.py", "--synthetic", "3000", "--dim", "16", "--out", str(tmp_path / "export"),
        "--requests", "40", "--clients", "4", "--time-limit", "20",
    )  # fmt: skip
    assert "similar" in out and "recommend" in out and "p99" in out
