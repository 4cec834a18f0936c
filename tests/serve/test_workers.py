"""``towerrec-serve --workers 2``: each worker listens on its own socket and a burst of new connections
spreads over both, a SIGHUP replaces both workers while every request is answered, and the histories
sent in requests never reach the server's log."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from towerrec.retrieval import load_export
from towerrec.serve.listeners import reuse_port_available, sockets_held

from .conftest import TOKEN, Server, env, serve_command

#: Bounds of the request loop: it stops by itself.
MAX_REQUESTS = 400
MAX_SECONDS = 300


def workers(pid: int) -> set[int]:
    """The uvicorn worker processes (spawned children) of the main process ``pid``."""
    found = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:  # not the resource tracker
            found.add(int(child))
    return found


@pytest.fixture(scope="module")
def two_workers(serve_exports, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONUNBUFFERED", "1")  # every log line reaches the file as it is written
        srv = Server(serve_exports["flat"], "--workers", "2", "--admin-token", TOKEN,
                     log=tmp_path_factory.mktemp("workers") / "server.log")  # fmt: skip
    try:
        srv.wait_ready()
        deadline = time.monotonic() + 240
        while len(workers(srv.proc.pid)) < 2:
            assert time.monotonic() < deadline, srv.log.read_text()[-3000:]
            time.sleep(0.3)
        yield srv
    finally:
        srv.stop()


@pytest.mark.skipif(
    not reuse_port_available("127.0.0.1", 1) or not Path("/proc/net/tcp").is_file(),
    reason="a listening socket per worker (SO_REUSEPORT) is used on Linux only",
)
@pytest.mark.slow
def test_each_worker_listens_on_its_own_socket_and_a_burst_of_connections_spreads(two_workers):
    pids = workers(two_workers.proc.pid)
    deadline = time.monotonic() + 240
    listening = sockets_held(pids, two_workers.port, "0A")
    while not all(listening.values()):  # a worker listens once it has loaded and verified the export
        assert time.monotonic() < deadline, listening
        time.sleep(0.3)
        listening = sockets_held(pids, two_workers.port, "0A")
    assert [len(s) for s in listening.values()] == [1, 1]
    assert len(set.union(*listening.values())) == 2  # two sockets, not the parent's one inherited
    # 16 connections opened at once, no request on any: with one shared socket the worker that woke
    # first took all of them in most bursts; over a SO_REUSEPORT group the kernel hashes each one to a
    # worker (all 16 on one of two: 1 in 32,768).
    conns = [socket.create_connection(("127.0.0.1", two_workers.port), timeout=10) for _ in range(16)]
    try:
        deadline = time.monotonic() + 30
        held = {pid: len(s) for pid, s in sockets_held(pids, two_workers.port, "01").items()}
        while sum(held.values()) < 16:  # until the workers have accepted them all
            assert time.monotonic() < deadline, held
            time.sleep(0.1)
            held = {pid: len(s) for pid, s in sockets_held(pids, two_workers.port, "01").items()}
        assert min(held.values()) >= 1, held
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.skipif(not reuse_port_available("127.0.0.1", 1), reason="a listening socket per worker on Linux only")
def test_workers_on_a_port_in_use_stop_with_one_line(serve_exports):
    with socket.socket() as taken:  # another program's socket, outside the SO_REUSEPORT group
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(serve_command(serve_exports["flat"], port, "--workers", "2"),
                             capture_output=True, text=True, timeout=300, env=env())  # fmt: skip
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP") or not Path("/proc").is_dir(), reason="needs POSIX signals and /proc")
@pytest.mark.slow
def test_sighup_replaces_both_workers_and_every_request_is_answered(two_workers):
    ids = httpx.get(f"{two_workers.url}/v1/export").json()["example_item_ids"]
    before = workers(two_workers.proc.pid)
    assert len(before) == 2
    answers: list[int | str] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + MAX_SECONDS
        for n in range(MAX_REQUESTS):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                if n % 2:
                    r = httpx.get(f"{two_workers.url}/v1/items/{ids[n % len(ids)]}/similar", params={"k": 5}, timeout=120)
                else:
                    r = httpx.post(f"{two_workers.url}/v1/recommend", json={"history": ids[:2], "k": 5}, timeout=120)
                answers.append(r.status_code)
            except httpx.HTTPError as err:  # a dropped request: the test fails below
                answers.append(repr(err))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        while len(answers) < 10:
            assert thread.is_alive(), answers
            time.sleep(0.1)
        os.kill(two_workers.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 240
        while True:  # both workers replaced, and the new ones answering
            now = workers(two_workers.proc.pid)
            if len(now) == 2 and not now & before:
                break
            assert time.monotonic() < deadline, (before, now, two_workers.log.read_text()[-3000:])
            time.sleep(0.3)
        served_after = len(answers)
        while len(answers) < served_after + 20 and thread.is_alive():
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(150)
    assert len(answers) >= 30 and set(answers) == {200}, [a for a in answers if a != 200][:5]
    assert two_workers.proc.poll() is None
    assert "Received SIGHUP, restarting processes." in two_workers.log.read_text()


@pytest.fixture(params=[1, 2], ids=["one_process", "two_workers"])
def fresh_server(request, serve_exports, tmp_path):
    """A server with its own log: one process (towerrec's own log lines show) or the two workers."""
    if request.param == 2:
        return request.getfixturevalue("two_workers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONUNBUFFERED", "1")
        srv = Server(serve_exports["flat"], "--log-level", "debug", log=tmp_path / "server.log")
    request.addfinalizer(srv.stop)
    return srv.wait_ready()


@pytest.mark.slow
def test_histories_sent_in_requests_never_reach_the_log(fresh_server, serve_exports):
    server = fresh_server
    items = load_export(serve_exports["flat"]).items["item_id"].tolist()
    history = items[60:63]  # ids no URL of these tests names
    secret = "NOT_AN_ITEM_7f3a91"  # unknown: the 404 names it to the client, the log must not
    ok = httpx.post(f"{server.url}/v1/recommend", json={"history": history, "k": 5}, timeout=120)
    assert ok.status_code == 200
    bad = httpx.post(f"{server.url}/v1/recommend", json={"history": [history[0], secret], "k": 5}, timeout=120)
    assert bad.status_code == 404 and secret in bad.text
    batch = httpx.post(f"{server.url}/v1/recommend/batch", json={"queries": [{"history": history, "k": 3}]}, timeout=120)
    assert batch.status_code == 200
    server.stop()  # the processes flush and exit: the log is complete
    log = server.log.read_text()
    assert "POST /v1/recommend" in log  # the access log is on: the history's absence means something
    for item_id in [*history, secret]:
        assert item_id not in log, f"{item_id} is in the server log"
