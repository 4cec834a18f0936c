"""``towerrec-serve --workers 2``: both workers map the one index file (and embeddings) of the export."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            for c in map(int, children):
                out.append(c)
                todo.append(c)
    return out


def _mapped(pid: int, path: Path) -> bool:
    try:
        return any(line.rstrip().endswith(str(path)) for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
def test_two_workers_map_one_index_file(serve_exports, tmp_path):
    export = serve_exports["flat"].resolve()
    srv = Server(export, "--workers", "2", log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        item = httpx.get(f"{srv.url}/v1/export", timeout=30).json()["example_item_ids"][0]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both workers up: each has loaded the export
            workers = [p for p in _descendants(srv.proc.pid) if _mapped(p, export / "index.faiss")]
            if len(workers) >= 2:
                break
            httpx.get(f"{srv.url}/v1/items/{item}/similar", timeout=30)
            time.sleep(0.5)
        assert len(workers) == 2, f"index.faiss mapped by {workers} (descendants {_descendants(srv.proc.pid)})"
        assert all(_mapped(p, export / "item_embeddings.npy") for p in workers)
        assert httpx.get(f"{srv.url}/v1/items/{item}/similar", timeout=30).status_code == 200
    finally:
        srv.stop()
