"""Real ``towerrec-serve`` processes on free local ports, over exports of the session's tiny checkpoint."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import towerrec

SRC = str(Path(towerrec.__file__).resolve().parents[1])  # the checkout under test, not an installed copy
TOKEN = "test-token"
#: A server left running by a failed test is killed after this long.
SERVER_LIFETIME_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(export: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "towerrec.commands.serve", "--export", str(export), "--port", str(port), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def terminate(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop a child process: SIGTERM, then SIGKILL if it is still running after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Server:
    """A ``towerrec-serve`` subprocess; ``url`` once it answers ``/readyz``."""

    def __init__(self, export: Path, *extra: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            serve_command(export, self.port, *extra),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        self._reaper = threading.Timer(SERVER_LIFETIME_S, self.proc.kill)  # it stops by itself
        self._reaper.daemon = True
        self._reaper.start()

    def wait_ready(self, timeout: float = 240) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"towerrec-serve exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"towerrec-serve not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self._reaper.cancel()
        terminate(self.proc)
        self._log_file.close()


@pytest.fixture(scope="session")
def serve_exports(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """``flat`` and ``hnsw`` exports of the tiny checkpoint, and ``served``: the folder a server reads
    (a copy of ``flat`` that the reload test replaces)."""
    from conftest import index_spec

    from towerrec.retrieval.writer import export_index

    root = tmp_path_factory.mktemp("serve_exports")
    out = {
        name: export_index(tiny_ckpt, index_spec(name), root / name, n_queries=100)
        for name in ("flat", "hnsw")
    }
    out["served"] = Path(shutil.copytree(out["flat"], root / "served"))
    out["tampered"] = Path(shutil.copytree(out["flat"], root / "tampered"))
    with open(out["tampered"] / "item_embeddings.npy", "r+b") as f:  # same size, one byte changed
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    return out


@pytest.fixture(scope="session")
def tampered_start(serve_exports, tmp_path_factory) -> subprocess.Popen:
    """A server started on the tampered export (runs while the real server starts; it must refuse)."""
    return subprocess.Popen(
        serve_command(serve_exports["tampered"], free_port()),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip


@pytest.fixture(scope="session")
def server(serve_exports, tampered_start, tmp_path_factory):
    """One server over ``served``, with an admin token and small limits, shared by the serve tests."""
    srv = Server(
        serve_exports["served"],
        "--admin-token", TOKEN, "--max-k", "50", "--max-batch", "4", "--max-items", "20",
        "--max-body-bytes", "4000",
        log=tmp_path_factory.mktemp("server") / "server.log",
    )  # fmt: skip
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()
