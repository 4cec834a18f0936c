"""Concurrent and interrupted prepares, with real processes: a race, a SIGKILL, a parallel sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_DATA, TINY_TRAIN, compose_cfg

from towerrec import CONFIG_DIR
from towerrec.data.build import ensure_prepared, prepare
from towerrec.data.manifest import load_manifest, read_manifest
from towerrec.data.schema import DataError
from towerrec.evaluation.results import read_results

# A child that composes the prepare config, signals it is ready, waits for "go", then prepares.
# The barrier makes both children call prepare() within milliseconds of each other.
CHILD = r"""
import logging, sys, time
from pathlib import Path
from hydra import compose, initialize_config_dir
from towerrec.data.build import PrepareSettings, prepare
config_dir, barrier, force, *overrides = sys.argv[1:]
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
    cfg = compose(config_name="prepare", overrides=overrides)
settings = PrepareSettings.from_config(cfg.data)
if barrier != "-":
    Path(barrier + ".ready." + str(__import__("os").getpid())).touch()
    while not Path(barrier + ".go").exists():
        time.sleep(0.002)
prepare(settings, force=force == "true", workers=1)
"""


def _child(barrier: str, force: bool, overrides: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, CONFIG_DIR, barrier, "true" if force else "false", *overrides]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(f".{out.name}.*") if p.is_dir())


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_two_processes_racing_on_a_fresh_folder(tmp_path, force):
    out = tmp_path / "proc"
    overrides = [*TINY_DATA, f"data.processed_dir={out}"]
    barrier = str(tmp_path / "barrier")
    children = [_child(barrier, force, overrides) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("barrier.ready.*"))) < 2:
        assert time.monotonic() < deadline and all(c.poll() is None for c in children), "children did not start"
        time.sleep(0.01)
    Path(barrier + ".go").touch()
    logs = [c.communicate(timeout=300)[1] for c in children]
    assert [c.returncode for c in children] == [0, 0], logs
    built = [i for i, log in enumerate(logs) if "towerrec.data.build prepared " in log]
    assert len(built) == 1, logs  # exactly one process built the folder
    waiter = logs[1 - built[0]]
    assert "another process is preparing it" in waiter and "was prepared by another process" in waiter, waiter
    manifest = load_manifest(out)  # every listed file present with its size
    assert manifest["build"]["pid"] == children[built[0]].pid
    assert set(manifest["files"]) >= {"interactions.parquet", "items.parquet", "users.parquet", "images.npy"}
    assert _leftovers(out) == []


def _kill_mid_prepare(out: Path, overrides: list[str]) -> list[str]:
    """Start a prepare, SIGKILL it while its temporary folder is being written; the files it had written."""
    child = _child("-", True, overrides)
    deadline = time.monotonic() + 180
    while True:
        tmp = [p for p in out.parent.glob(f".{out.name}.tmp-*") if (p / "interactions.parquet").is_file()]
        if tmp:
            break
        assert child.poll() is None, f"prepare ended before it could be killed: {child.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert child.poll() is None
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return sorted(p.name for p in tmp[0].iterdir())


# Big enough that writing the folder takes a good fraction of a second, so the kill lands halfway.
KILL_DATA = ["data.source.n_users=6000", "data.source.n_items=20000", "data.source.n_interactions=60000",
             "data.image_size=32"]


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_folder_or_the_previous_one(tmp_path):
    out = tmp_path / "proc"
    overrides = [*KILL_DATA, f"data.processed_dir={out}"]
    # 1. Fresh folder: the kill leaves none, and nothing loads as if it were one.
    written = _kill_mid_prepare(out, overrides)
    assert "interactions.parquet" in written and "manifest.json" not in written
    assert not out.exists() and read_manifest(out) is None
    with pytest.raises(DataError, match="not a processed folder"):
        load_manifest(out)
    # 2. A complete previous folder survives a killed rebuild unchanged.
    cfg = compose_cfg("prepare", overrides, tmp_path).data
    ensure_prepared(cfg, workers=1)
    assert _leftovers(out) == []  # the killed build's temporary folder was removed under the lock
    before = load_manifest(out)
    _kill_mid_prepare(out, overrides)
    after = load_manifest(out)
    assert after["build"] == before["build"] and after["files"] == before["files"]
    # The killed build's temporary folder (and its DuckDB scratch folder) stay until the next build.
    kinds = sorted(p.name.split(".")[2].split("-")[0] for p in _leftovers(out))
    assert kinds in (["tmp"], ["spill", "tmp"]), kinds
    assert ensure_prepared(cfg, workers=1) == out  # still current: no rebuild needed
    assert load_manifest(out)["build"] == before["build"]


def test_loading_refuses_a_folder_that_lost_or_truncated_a_file(tmp_path):
    cfg = compose_cfg("prepare", [*TINY_DATA, f"data.processed_dir={tmp_path}/proc"], tmp_path).data
    out = prepare(cfg, workers=1)
    (out / "users.parquet").unlink()
    with pytest.raises(DataError, match=r"incomplete processed folder: users\.parquet is missing") as err:
        load_manifest(out)
    assert "\n" not in str(err.value)
    with open(out / "item_text.npy", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"item_text\.npy has 10 bytes, the manifest records \d+"):
        load_manifest(out)
    # ensure_prepared treats an incomplete folder as stale and rebuilds it
    ensure_prepared(cfg, workers=1)
    assert load_manifest(out)["files"]["users.parquet"]["bytes"] > 0


@pytest.mark.slow
def test_parallel_multirun_on_unprepared_data(tmp_path):
    """``towerrec-train -m`` through Hydra's joblib launcher: two jobs start on data nobody prepared."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs hydra-joblib-launcher (dev extra)")
    out = tmp_path / "proc"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", *TINY_DATA,
            f"data.processed_dir={out}", *TINY_TRAIN, f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run([sys.executable, "-m", "towerrec.commands.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]"))
    assert len(jobs) == 2 and all((j / "metrics.json").is_file() for j in jobs)
    logs = [next(j.glob("*.log")).read_text() for j in jobs]
    assert sum("prepared " + str(out) in log for log in logs) == 1, logs  # one job built, the other reused it
    hashes = {read_results(j / "metrics.json").data["config_hash"] for j in jobs}
    assert hashes == {load_manifest(out)["config_hash"]}
