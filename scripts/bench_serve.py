"""Load-test ``towerrec-serve``: QPS and p50/p95/p99 latency over HTTP, beside the same queries in-process.

The script starts ``towerrec-serve`` on 127.0.0.1 (a free port) as a subprocess and drives it from C
concurrent keep-alive clients with a fixed number of requests and a time limit per phase. The clients
connect one after another before a phase's clock starts, each answered once before the next connects
(``--burst``: all at once as it starts, when the worker that wakes first may accept every one of
them); the table says how the connections spread over the server's processes. The phases:
``similar`` (GET /v1/items/{id}/similar), ``recommend`` (POST /v1/recommend), then a mixed phase with
one admin reload in the middle. The same queries are then answered in this process through the Python
API (``load_export(...).similar_items`` / ``.recommend``, one thread). Prints a markdown table.

    python scripts/bench_serve.py --export exports/flat
    python scripts/bench_serve.py --synthetic 1000000 --index ivf_flat --out /tmp/syn1m   # builds it once

``--synthetic N`` writes an export of N random unit vectors (no training of the items; a tiny
checkpoint of the same dim is trained once for the user tower, or pass ``--checkpoint``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import pandas as pd

from towerrec.fileio import markdown_table

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------- a synthetic export, no training
def synthetic_export(
    out: Path, n: int, dim: int, index_name: str, ckpt: Path, seed: int = 0, catalog: str = "random"
) -> Path:
    """Write an export folder of ``n`` unit vectors in ``dim``-d (``random``, or ``clustered``: a mixture
    of Gaussian clusters on the sphere), in the format ``towerrec-export`` writes (and ``load_export``
    verifies), with ``ckpt`` as its user tower. The search setting is tuned to the config's
    ``target_recall`` as the export does, on catalog items and on held-out vectors of the same law
    (standing in for user queries)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from towerrec import CONFIG_DIR
    from towerrec.fileio import file_sha256
    from towerrec.retrieval.folder import FORMAT
    from towerrec.retrieval.index import METRIC_NAME, build_index, exact_search, measure_recall
    from towerrec.retrieval.tune import tune_built
    from towerrec.retrieval.vectors import clustered_unit, random_unit
    from towerrec.retrieval.writer import write_export

    rng = np.random.default_rng(seed)
    make = clustered_unit if catalog == "clustered" else random_unit
    vectors = make(n + 500, dim, seed=seed)
    held_out, vectors = vectors[n:], vectors[:n]
    ids = np.arange(1, n + 1, dtype=np.int64)
    items = pd.DataFrame({
        "item_idx": ids,
        "item_id": [f"X{i:08d}" for i in ids],
        "title": [f"synthetic item {i}" for i in ids],
        "image_path": None,
        "is_cold": rng.random(n) < 0.1,
        "has_image": False,
    })  # fmt: skip
    spec = instantiate(OmegaConf.load(Path(CONFIG_DIR) / "index" / f"{index_name}.yaml"))
    t0 = time.perf_counter()
    built = build_index(spec, vectors, ids)
    print(f"built {built.factory} over {n} vectors in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    point = {"params": built.spec.search_params}
    if spec.target_recall is not None:
        item_q = vectors[rng.choice(n, 500, replace=False)]
        sets = {"user": (held_out, exact_search(vectors, ids, held_out, 10)),
                "item": (item_q, exact_search(vectors, ids, item_q, 10))}  # fmt: skip
        built, tuned = tune_built(built, vectors, ids, sets, 10, spec.target_recall, f"index={index_name}")
        point = tuned.to_manifest()
        print(f"operating point {point['params']}: recall {point['recall']}, {point['ms_per_query']} ms/query",
              file=sys.stderr)  # fmt: skip
    queries = vectors[rng.choice(n, 200, replace=False)]
    recall = {"k": 10, "reference": "exact inner-product search", "item_queries": 200,
              "recall_item": measure_recall(built.index, vectors, ids, queries, 10), "recall_user": None}  # fmt: skip
    manifest = {
        "format": FORMAT,
        "checkpoint": {"path": str(ckpt.resolve()), "sha256": file_sha256(ckpt)},
        "data": {"name": f"{catalog}_unit_{n}x{dim}", "config_hash": None},
        "model": {"dim": dim, "max_history": 50},
        "index": {"name": spec.name, "spec": asdict(built.spec), "device": built.device,
                  "choice": built.spec.reason},  # fmt: skip
        "factory": built.factory,
        "metric": METRIC_NAME,
        "dim": dim,
        "count": n,
        "cold_count": int(items["is_cold"].sum()),
        "recall": recall,
        "operating_point": point,
        "build_seconds": built.build_seconds,
        "image_cache": None,
    }
    write_export(out, built.index, items, vectors, manifest, overwrite=True)
    return out


def tiny_checkpoint(root: Path, dim: int) -> Path:
    """A two-batch checkpoint on a small synthetic shop whose user tower reads ``dim``-d item vectors."""
    from hydra import compose, initialize_config_dir

    from towerrec import CONFIG_DIR
    from towerrec.commands.train import train

    overrides = [
        f"data.processed_dir={root / 'processed'}", f"paths.output_dir={root / 'run'}",
        "data.source.n_users=200", "data.source.n_items=150", "data.source.n_interactions=3000",
        "data.image_size=16", f"model.dim={dim}", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.enable_progress_bar=false", "~callbacks.progress_bar", "~callbacks.lr_monitor", "logger=none",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return Path(train(cfg).run["best_checkpoint"])


# ---------------------------------------------------------------------- load
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(lat_s: list[float]) -> dict[str, float]:
    if not lat_s:
        return {"p50 ms": float("nan"), "p95 ms": float("nan"), "p99 ms": float("nan")}
    p = np.percentile(np.asarray(lat_s) * 1000, [50, 95, 99])
    return {"p50 ms": p[0], "p95 ms": p[1], "p99 ms": p[2]}


class Connection:
    """One keep-alive HTTP/1.1 connection with no client library: the load generator shares the server's
    cores, so each request it sends should cost it as little Python as possible (requests are encoded
    before the clock starts; a reply is read by its ``Content-Length``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request; ``(status, body)``. A dropped connection raises and is reopened next time."""
        await self.connect()
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            at = head.lower().find(b"\r\ncontent-length:")
            if at < 0:
                raise ValueError(f"reply without Content-Length: {head[:200]!r}")
            length = int(head[at + 17 : head.index(b"\r\n", at + 2)])
            return status, await self.reader.readexactly(length)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def encode(method: str, path: str, body: dict | None, host: str, headers: dict | None = None) -> bytes:
    """One HTTP/1.1 request as bytes (a GET's parameters go in ``path``)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    payload = b""
    if body is not None:
        payload = json.dumps(body).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def as_path(path: str, params: dict) -> str:
    return f"{path}?{urlencode(params, doseq=True)}" if params else path


def connections_per_process(pids: list[int], port: int) -> list[int]:
    """Established TCP connections on ``port`` that each of ``pids`` holds (Linux ``/proc``), most first.

    With one listening socket shared by the workers (``--shared-socket``, uvicorn's way), the worker
    that wakes first accepts every connection waiting: a burst of new connections can all land on one.
    """
    from towerrec.serve.listeners import sockets_held

    return sorted((len(s) for s in sockets_held(pids, port, "01").values() if s), reverse=True)


async def batch_counters(conns: list, host: str) -> dict[str, dict]:
    """Each server worker's micro-batching counters (``/v1/export``'s ``batching``), keyed by the worker's
    ``loaded_at``, read over the raw connections (each held by one worker)."""
    out = {}
    for conn in conns:
        status, body = await conn.request(encode("GET", "/v1/export", None, host))
        if status == 200:
            info = json.loads(body)
            out[str(info.get("loaded_at"))] = info.get("batching") or {}
    return out


def mean_batches(before: dict[str, dict], after: dict[str, dict]) -> str:
    """Queries per batch in each worker between two :func:`batch_counters` readings, for the batcher that
    moved (``similar`` or ``recommend``); ``–`` where a worker was not seen both times (a reload)."""
    sizes = []
    for worker, now in after.items():
        then = before.get(worker)
        if then is None:
            return "–"
        for kind, c in now.items():
            batches = c["batches"] - then.get(kind, {}).get("batches", 0)
            if batches:
                sizes.append(f"{(c['queries'] - then[kind]['queries']) / batches:.1f}")
    return "/".join(sizes) or "–"


async def drive(url: str, requests: list[tuple[str, str, dict]], clients: int, time_limit: float,
                at_half=None, client: str = "raw", burst: bool = False, server_pid: int | None = None) -> dict:  # fmt: skip
    """Send ``requests`` (method, path, params-or-json) from ``clients`` concurrent clients; stop at the time limit.

    ``client``: ``raw`` (one :class:`Connection` per client) or ``httpx`` (``httpx.AsyncClient``).
    ``at_half``: an async callable run once, when half the requests have been sent (the reload).
    ``burst``: raw clients connect all at once when the clock starts (all may land on one worker);
    by default they connect one after another before it, as clients that arrive over time do.
    ``server_pid``: report how the raw clients' connections spread over the server's processes.
    """
    latencies, errors, samples = [], 0, []
    next_i = 0
    deadline = time.perf_counter() + time_limit
    half_result = {}
    host, port = url.removeprefix("http://").split(":")
    if client == "raw":
        encoded = [encode(m, p if m == "POST" else as_path(p, b), b if m == "POST" else None, host)
                   for m, p, b in requests]  # fmt: skip
    conns = [Connection(host, int(port)) if client == "raw" else None for _ in range(clients)]
    spread, counted = [], client == "raw" and not burst
    if counted:
        for conn in conns:  # each connection answers one request before the next opens (as a warm pool)
            await conn.request(encode("GET", "/healthz", None, host))
        if server_pid is not None:
            spread = connections_per_process(process_tree(server_pid), int(port))
        before = await batch_counters(conns, host)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def worker(conn):
            nonlocal next_i, errors
            while next_i < len(requests) and time.perf_counter() < deadline:
                i = next_i
                next_i += 1
                if at_half is not None and i == len(requests) // 2:
                    half_result.update(await at_half(http))
                t0 = time.perf_counter()
                try:
                    if conn is not None:
                        status, text = await asyncio.wait_for(conn.request(encoded[i]), 30)
                    else:
                        method, path, body = requests[i]
                        if method == "GET":
                            res = await http.get(path, params=body)
                        else:
                            res = await http.post(path, json=body)
                        status, text = res.status_code, res.content
                    ok = status == 200
                except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                        httpx.HTTPError) as err:  # fmt: skip
                    ok, text = False, repr(err).encode()
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors += 1
                    if len(samples) < 3:
                        samples.append(text[:200].decode(errors="replace"))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(conn) for conn in conns))
        wall = time.perf_counter() - t0
    batch = mean_batches(before, await batch_counters(conns, host)) if counted else "–"
    for conn in conns:
        if conn is not None:
            conn.close()
    return {"done": len(latencies), "errors": errors, "wall": wall, "latencies": latencies,
            "samples": samples, "spread": spread, "batch": batch, **half_result}  # fmt: skip


def run_loop(coro):
    """Run ``coro`` on uvloop where it is installed (a cheaper event loop for the load generator)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (Linux ``/proc``; 0 for one that is gone)."""
    return _stat_sum(pids, (11, 12)) / os.sysconf("SC_CLK_TCK")  # utime, stime


def minor_faults(pids: list[int]) -> int:
    """Minor page faults of these processes: memory the kernel mapped (and zeroed) for them."""
    return _stat_sum(pids, (7,))  # minflt


def _stat_sum(pids: list[int], columns: tuple[int, ...]) -> int:
    """The sum of ``/proc/<pid>/stat`` columns (counted after the command name) over ``pids``."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(fields[c]) for c in columns)
    return total


def process_tree(pid: int) -> list[int]:
    procs, todo = [], [pid]
    while todo:
        p = todo.pop()
        procs.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
    return procs


def cpu_times() -> list[int]:
    """The machine's CPU time by state (``/proc/stat``'s first line, in clock ticks; empty without it)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return []


def steal_share(before: list[int], after: list[int]) -> float:
    """Of the CPU time between two :func:`cpu_times`, the share the hypervisor gave to other guests (steal)."""
    if len(before) < 8 or len(after) < 8:
        return float("nan")
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return delta[7] / max(1, sum(delta[:8]))  # user nice system idle iowait irq softirq steal


def phase(server_pid: int, coro) -> dict:
    """Run one load phase; add the CPU seconds the server's processes and this load generator spent.

    Also the machine's steal time over the phase: on a virtual machine a busy neighbour makes every
    request cost more CPU time, which the server's own figures cannot tell apart from its own work.
    """
    pids = process_tree(server_pid)
    server0, client0, machine0 = cpu_seconds(pids), time.process_time(), cpu_times()
    faults0 = minor_faults(pids)
    result = run_loop(coro)
    result["server_cpu"] = cpu_seconds(pids) - server0
    result["server_faults"] = minor_faults(pids) - faults0
    result["client_cpu"] = time.process_time() - client0
    result["steal"] = steal_share(machine0, cpu_times())
    return result


def in_process(answer, queries: list, time_limit: float) -> dict:
    """The same queries through the Python API (``answer(query)``), one thread."""
    latencies, deadline = [], time.perf_counter() + time_limit
    t0 = time.perf_counter()
    for q in queries:
        if time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        answer(q)
        latencies.append(time.perf_counter() - t)
    return {"done": len(latencies), "errors": 0, "wall": time.perf_counter() - t0, "latencies": latencies}


def row(label: str, path: str, r: dict) -> dict:
    out = {"export": label, "query": path, "requests": r["done"], "errors": r["errors"],
           "QPS": r["done"] / r["wall"] if r["wall"] else float("nan"), **percentiles(r["latencies"])}  # fmt: skip
    if "server_cpu" in r:  # CPU per request: who pays for it, the server or the load generator
        out["server CPU ms/req"] = 1000 * r["server_cpu"] / max(1, r["done"])
        out["client CPU ms/req"] = 1000 * r["client_cpu"] / max(1, r["done"])
        out["server page faults/req"] = r["server_faults"] / max(1, r["done"])
        out["connections per process"] = "/".join(map(str, r.get("spread") or [])) or "–"
        out["steal %"] = 100 * r["steal"]
        out["queries per batch, by worker"] = r.get("batch", "–")
    return out


def _kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            out[key] = int(rest.split()[0])
    return out


def warm_user_towers(url: str, workers: int, send_recommends, tries: int = 10) -> str:
    """Send recommend queries until every worker has loaded the user tower; a note saying how it went.

    Each worker loads it at its own first history query (seconds of CPU and about 0.5 GB of pages). A
    warm-up whose connections all landed on one worker left the other to load it inside the timed
    recommend phase: about twice the server CPU and 70 page faults per request over the phase, in
    roughly a third of the runs. Each worker's ``/v1/export`` says whether it has loaded it; new
    connections land on either worker.
    """
    seen: dict[str, bool] = {}
    for attempt in range(tries):
        seen = {}
        for _ in range(8 * workers):
            info = httpx.get(f"{url}/v1/export", timeout=30).json()  # a new connection each
            seen[str(info["loaded_at"])] = bool(info.get("user_model_loaded"))
        if len(seen) >= workers and all(seen.values()):
            return f"user tower loaded in all {len(seen)} worker(s) before timing ({attempt} extra warm-up round(s))"
        send_recommends()
    return f"warning: user tower loaded in {sum(seen.values())} of {len(seen)} worker(s) seen before timing"


def memory_note(pid: int, export: Path) -> str:
    """Memory of the server's processes (Linux): resident, of it mapped from files (the shared
    vectors), proportional (shared pages split between processes); and who maps index.faiss."""
    if not Path(f"/proc/{pid}/smaps_rollup").exists():
        return "memory: not measured (no /proc)"
    procs = process_tree(pid)
    rows, index_file = [], str((export / "index.faiss").resolve())
    for p in procs:
        try:
            m = _kib(p, ("Rss", "Pss"))
            maps = index_file in Path(f"/proc/{p}/maps").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        rows.append((p, m.get("Rss", 0), m.get("Pss", 0), maps))
    mapping = sum(1 for r in rows if r[3])
    total_rss = sum(r[1] for r in rows) / 1024
    total_pss = sum(r[2] for r in rows) / 1024
    return (f"memory: {len(rows)} server process(es), RSS sum {total_rss:.0f} MiB, PSS sum {total_pss:.0f} MiB "
            f"(shared pages counted once); {mapping} map index.faiss")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", type=Path, help="an export folder written by towerrec-export")
    src.add_argument(
        "--synthetic", type=int, metavar="N", help="benchmark N random unit vectors (built once)"
    )
    p.add_argument("--out", type=Path, help="--synthetic: where the export goes (reused when it exists)")
    p.add_argument("--dim", type=int, default=64, help="--synthetic: vector size (default 64)")
    p.add_argument(
        "--index", default="auto", help="--synthetic: configs/index/<name>.yaml (default auto)"
    )
    p.add_argument("--catalog", choices=["random", "clustered"], default="random",
                   help="--synthetic: random unit vectors (the hard case) or Gaussian clusters on the sphere")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="towerrec-serve --workers (memory is reported)")
    p.add_argument("--checkpoint", type=Path, help="--synthetic: user-tower checkpoint of the same dim")
    p.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (default 16)")
    p.add_argument("--requests", type=int, default=2000, help="requests per phase (default 2000)")
    p.add_argument("--time-limit", type=float, default=60, help="seconds per phase at most (default 60)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--history-len", type=int, default=5, help="items per recommend history (default 5)")
    p.add_argument("--threads", type=int, default=1, help="towerrec-serve --threads (default 1)")
    p.add_argument("--label", help="the export's name in the table")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="load generator: raw keep-alive connections (default; little Python per request) or httpx")  # fmt: skip
    p.add_argument("--burst", action="store_true",
                   help="raw clients connect all at once as a phase starts (by default one after another before it)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.synthetic:
        name = f"towerrec_synthetic_{args.catalog}_{args.synthetic}x{args.dim}_{args.index}"
        out = args.out or Path(tempfile.gettempdir()) / name
        if not (out / "manifest.json").is_file():
            ckpt = args.checkpoint or tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench_serve_")), args.dim)
            synthetic_export(out, args.synthetic, args.dim, args.index, ckpt, args.seed, args.catalog)
        export = out
    else:
        export = args.export
    label = args.label or export.name

    from towerrec.retrieval import load_export

    index = load_export(export)
    rng = np.random.default_rng(args.seed)
    ids = index.items["item_id"].astype(str).to_numpy()
    n = args.requests
    similar_q = [{"item_id": str(i), "k": args.k} for i in rng.choice(ids, n)]
    recommend_q = [{"history": [str(i) for i in rng.choice(ids, args.history_len, replace=False)], "k": args.k}
                   for _ in range(n)]  # fmt: skip

    token = secrets.token_hex(16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "towerrec.commands.serve", "--export", str(export), "--port", str(port),
           "--admin-token", token, "--no-access-log", "--threads", str(args.threads), "--log-level", "warning",
           "--preload-user-tower",
           "--workers", str(args.workers)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(cmd, env=env)
    rows, notes = [], []
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                sys.exit(f"error: towerrec-serve exited with {server.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        notes.append(f"server ready in {time.perf_counter() - t0:.1f}s (verified export)")
        warm = [("GET", f"/v1/items/{q['item_id']}/similar", {"k": q["k"]}) for q in similar_q[:200]]
        warm += [("POST", "/v1/recommend", q) for q in recommend_q[:40]]  # loads the user tower
        run_loop(drive(url, warm, 4, 600, client=args.client))
        notes.append(warm_user_towers(url, args.workers, lambda: run_loop(drive(url, warm[-40:], args.clients, 600, client=args.client))))
        notes.append(memory_note(server.pid, export))

        def sim(q):
            return ("GET", f"/v1/items/{q['item_id']}/similar", {"k": q["k"]})

        load = dict(clients=args.clients, time_limit=args.time_limit, client=args.client, burst=args.burst,
                    server_pid=server.pid)  # fmt: skip
        http_sim = phase(server.pid, drive(url, [sim(q) for q in similar_q], **load))
        http_rec = phase(server.pid, drive(url, [("POST", "/v1/recommend", q) for q in recommend_q], **load))

        async def reload(client):
            t = time.perf_counter()
            res = await client.post(
                "/v1/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=600
            )
            return {"reload": res.json(), "reload_s": time.perf_counter() - t}

        mixed = [
            x
            for pair in zip(similar_q, recommend_q, strict=True)
            for x in (sim(pair[0]), ("POST", "/v1/recommend", pair[1]))
        ]
        http_mix = phase(server.pid, drive(url, mixed[:n], **{**load, "time_limit": 2 * args.time_limit}, at_half=reload))
    finally:
        server.terminate()
        server.wait(30)

    # The same thread counts as the server's, and the user tower loaded before timing (as the server's warm-up).
    from towerrec.retrieval.recommend import Recommender
    from towerrec.serve.state import set_threads

    recommender = Recommender(index)
    set_threads(args.threads)
    local_sim = in_process(lambda q: index.similar_items(q["item_id"], k=q["k"]), similar_q, args.time_limit)
    local_rec = in_process(lambda q: recommender.recommend(q["history"], k=q["k"]), recommend_q, args.time_limit)

    for path, http, local in (("similar", http_sim, local_sim), ("recommend", http_rec, local_rec)):
        r_http, r_local = (
            row(label, f"{path} HTTP ({args.clients} clients)", http),
            row(label, f"{path} in-process", local),
        )
        r_http["HTTP / in-process QPS"] = r_http["QPS"] / r_local["QPS"]
        rows += [r_http, r_local]
    mix_row = row(label, f"similar+recommend HTTP, reload mid-load ({args.clients} clients)", http_mix)
    rows.append(mix_row)
    reload_info = http_mix.get("reload", {})
    notes.append(
        f"reload: reloaded={reload_info.get('reloaded')} in {http_mix.get('reload_s', float('nan')):.2f}s, "
        f"failed requests in that phase: {http_mix['errors']} of {http_mix['done']}"
    )
    for r in (http_sim, http_rec, http_mix):
        notes += [f"error sample: {s}" for s in r["samples"]]
    print(f"export: {export} ({len(index)} items, {index.manifest['factory']}, dim {index.manifest['dim']}); "
          f"towerrec-serve --threads {args.threads}, {args.workers} worker(s); {os.cpu_count()} CPUs")  # fmt: skip
    print()
    print(markdown_table(rows, floatfmt=".2f"))
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
