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

import socket
import sys
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
    sock.set_inheritable(True)
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
