"""One listening socket per worker (``SO_REUSEPORT``), so the kernel spreads new connections evenly.

uvicorn's workers share the parent's one listening socket, and the worker that wakes first accepts every
connection waiting: a burst of 16 new connections landed all on one of two workers in 4 of 6 probes
(``scripts/bench_serve.py --burst``), which then served the phase on one core. Here each worker binds
its own socket into one ``SO_REUSEPORT`` group on the same address, and Linux hashes every new
connection to one of the group's listening sockets. The parent keeps a bound socket of the group that
never listens: it holds the port while workers come and go.

uvicorn's own supervisor still runs the workers (health checks, a dead worker replaced, the SIGHUP
rolling restart): only its worker class is replaced for that run, by one that binds its own socket
instead of using the parent's.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from unittest import mock

import uvicorn
from uvicorn.supervisors import Multiprocess, multiprocess


def reuse_port_available(host: str, port: int) -> bool:
    """Linux spreads connections over a ``SO_REUSEPORT`` group; other systems send them to one socket.

    Port 0 (any free port) would give every worker a port of its own.
    """
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT") and port != 0 and not host.startswith("/")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` in the address's ``SO_REUSEPORT`` group (not listening yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _OwnSocketProcess(multiprocess.Process):
    """A uvicorn worker that serves on a ``SO_REUSEPORT`` socket of its own (made in the worker)."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover (a child)
        super().target([reuse_port_socket(self.config.host, self.config.port)])


def run_workers(config: uvicorn.Config) -> None:
    """Run ``config.workers`` workers under uvicorn's supervisor, each on its own listening socket."""
    holder = reuse_port_socket(config.host, config.port)  # the port, held; it never accepts
    try:
        with mock.patch.object(multiprocess, "Process", _OwnSocketProcess):
            Multiprocess(config, sockets=[]).run()
    finally:
        holder.close()


def sockets_held(pids: list[int] | set[int], port: int, state: str) -> dict[int, set[str]]:
    """The TCP sockets on local ``port`` in ``state`` (``/proc/net/tcp`` codes: ``0A`` listening, ``01``
    established) that each of ``pids`` holds, by inode (Linux ``/proc``; a process gone holds none)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == state:
                inodes.add(f"socket:[{f[9]}]")
    held = {}
    for pid in pids:
        links = set()
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            fds = []
        for fd in fds:
            try:
                links.add(os.readlink(fd))
            except OSError:  # closed meanwhile
                continue
        held[pid] = links & inodes
    return held
