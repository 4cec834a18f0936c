"""Benchmark ``towerrec-prepare``: H&M with images (rebuild and no-op) and the synthetic shop at 1M, 10M, 100M.

Every prepare runs in a child process (this script with ``--child``), so its wall time includes what a
user waits for and its peak RSS is that process's own (``os.wait4``), untouched by this process.
The child composes the real ``prepare`` config with ``hydra.compose`` and calls
:func:`towerrec.data.build.prepare` into a temporary processed folder (never ``data/processed``).

    python scripts/bench_prepare.py                          # H&M x2 + traced run + no-op, then 1M/10M/100M
    python scripts/bench_prepare.py --skip-scale --repeats 3
    python scripts/bench_prepare.py --skip-hm --sizes 1M,10M --tmp-dir /big/disk

A traced run times every line of ``prepare()`` and of the functions it calls for the split, the
segments and the source (a ``sys.settrace`` hook on those code objects only), and records how much
the process's peak RSS (``VmHWM``) rose on each line, so a slow or memory-hungry step shows up
with its line number. The manifest itself records only the total ``seconds``.

The machine may be shared: each section prints the load average next to its figures.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "
RSS_TARGET_GB = 8.0


# ----------------------------------------------------------------------------- child side
def _proc_status_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    rss = hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


class LineTracer:
    """Seconds and peak-RSS rise per line of a few functions, the innermost traced line charged.

    Only the given code objects get a local trace function, so the rest of the process (pandas,
    numpy, the generator's helpers) runs at nearly full speed; a call into an untraced function is
    charged to the traced line that made it.
    """

    def __init__(self, functions: list) -> None:
        self.codes = {f.__code__ for f in functions}
        self.stats: dict[tuple[str, int, str], list[float]] = {}  # (file, line, func) -> [s, hwm rise, hits]
        self.loc: tuple[str, int, str] | None = None
        self.t = time.perf_counter()
        self.hwm = _proc_status_mb()[1]
        self.peak_loc: tuple[str, int, str] | None = None

    def _charge(self, new_loc: tuple[str, int, str] | None) -> None:
        now = time.perf_counter()
        hwm = _proc_status_mb()[1]
        if self.loc is not None:
            s = self.stats.setdefault(self.loc, [0.0, 0.0, 0])
            s[0] += now - self.t
            s[1] += hwm - self.hwm
            s[2] += 1
            if hwm > self.hwm:
                self.peak_loc = self.loc
        self.loc, self.t, self.hwm = new_loc, time.perf_counter(), hwm

    def _global(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self._charge((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            return self._local
        return None

    def _local(self, frame, event, arg):
        code = frame.f_code
        if event == "line":
            self._charge((code.co_filename, frame.f_lineno, code.co_name))
        elif event == "return":
            back = frame.f_back
            if back is not None and back.f_code in self.codes:  # back on the caller's line
                self._charge((back.f_code.co_filename, back.f_lineno, back.f_code.co_name))
            else:
                self._charge(None)
        return self._local

    def __enter__(self) -> LineTracer:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)
        self._charge(None)

    def rows(self) -> tuple[list[dict], str | None]:
        """Per-line rows, slowest first, and the line where the peak RSS last rose."""
        out = []
        for (file, line, func), (s, rise, hits) in self.stats.items():
            code = linecache.getline(file, line).strip()
            out.append(
                {
                    "where": f"{Path(file).name}:{line}",
                    "func": func,
                    "code": code,
                    "s": s,
                    "hwm_rise_mb": rise,
                    "hits": hits,
                }
            )
        out.sort(key=lambda r: -r["s"])
        peak = self.peak_loc
        return out, (f"{Path(peak[0]).name}:{peak[1]}" if peak else None)


def child_main(spec: dict) -> None:
    """Compose the prepare config, run prepare once, print one JSON result line."""
    from hydra import compose, initialize_config_dir

    from towerrec import CONFIG_DIR
    from towerrec.data import build as prepare_mod
    from towerrec.data.sources import hm, synthetic

    t_import = time.perf_counter()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=spec["overrides"])
    rss0, _ = _proc_status_mb()
    result: dict = {"rss_before_mb": rss0}
    tracer = None
    t0 = time.perf_counter()
    if spec.get("trace"):
        tracer = LineTracer(
            [
                prepare_mod.prepare,
                prepare_mod._build,
                prepare_mod.customer_segments,
                hm.load_hm,
                synthetic.generate_synthetic_with_truth,
            ]
        )
        with tracer:
            out = prepare_mod.prepare(cfg.data, force=spec["force"], workers=spec["workers"])
    else:
        out = prepare_mod.prepare(cfg.data, force=spec["force"], workers=spec["workers"])
    result["prepare_s"] = time.perf_counter() - t0
    result["compose_s"] = t0 - t_import
    manifest = prepare_mod.read_manifest(out) or {}
    result["manifest_seconds"] = manifest.get("seconds")
    result["counts"] = manifest.get("counts", {})
    result["images"] = manifest.get("images", {})
    result["phase_info"] = {k: v for k, v in manifest.items() if k in ("phases", "timings", "phase_seconds")}
    result["rss_after_mb"], result["hwm_mb"] = _proc_status_mb()
    if tracer is not None:
        result["lines"], result["peak_at"] = tracer.rows()
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)


# ----------------------------------------------------------------------------- parent side
def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def run_child(spec: dict) -> dict:
    """Run one prepare in a child process; add its wall seconds and peak RSS (MB) from ``wait4``."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    return run_process(cmd, parse=True)


def run_process(cmd: list[str], parse: bool) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Read the pipes to EOF without reaping; wait4 then reaps the child with its own resource usage.
    out, err = _drain(proc)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"child failed ({proc.returncode}): {shlex.join(cmd)}\n{err[-3000:]}")
    res: dict = {}
    if parse:
        line = next(ln for ln in reversed(out.splitlines()) if ln.startswith(RESULT_TAG))
        res = json.loads(line[len(RESULT_TAG) :])
    res["wall_s"] = wall
    res["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KB; the child itself or its largest reaped child
    res["cpu_s"] = usage.ru_utime + usage.ru_stime
    return res


def _drain(proc: subprocess.Popen) -> tuple[str, str]:
    """Read stdout and stderr to EOF without reaping the process (so ``os.wait4`` can)."""
    import threading

    chunks: dict[str, list[str]] = {"out": [], "err": []}

    def pump(stream, key):
        chunks[key].append(stream.read())

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, "out")),
        threading.Thread(target=pump, args=(proc.stderr, "err")),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return "".join(chunks["out"]), "".join(chunks["err"])


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def print_lines(res: dict, top: int) -> None:
    lines = res["lines"]
    total = sum(r["s"] for r in lines) or 1.0
    print(
        f"\nTime and peak-RSS rise by line (traced run, {total:.1f} s traced; peak RSS reached at {res['peak_at']}):\n"
    )
    print("| where | function | code | s | % | hits | peak RSS rise MB |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    shown = lines[:top]
    for r in shown:
        code = r["code"].replace("|", "\\|")
        code = code if len(code) <= 70 else code[:67] + "..."
        print(
            f"| {r['where']} | {r['func']} | `{code}` | {r['s']:.2f} | {100 * r['s'] / total:.1f} | {r['hits']} | {r['hwm_rise_mb']:,.0f} |"
        )
    rest = lines[top:]
    if rest:
        s = sum(r["s"] for r in rest)
        rise = sum(r["hwm_rise_mb"] for r in rest)
        print(f"| ({len(rest)} other lines) | | | {s:.2f} | {100 * s / total:.1f} | | {rise:,.0f} |")
    risers = sorted((r for r in lines if r["hwm_rise_mb"] >= 50), key=lambda r: -r["hwm_rise_mb"])
    if risers:
        print(
            "\nLines that raised the peak RSS by 50 MB or more: "
            + ", ".join(f"{r['where']} (+{r['hwm_rise_mb']:,.0f} MB)" for r in risers)
        )


def bench_hm(args: argparse.Namespace, tmp: Path) -> None:
    out_dir = tmp / "hm"
    base = ["data=hm", f"data.processed_dir={out_dir}"] + args.hm_overrides
    rows = []
    print(f"\n## H&M prepare (images included), processed into {out_dir}\n")
    print(f"load average before: {load()}")
    for r in range(args.repeats):
        res = run_child({"overrides": base, "force": True, "workers": args.workers, "trace": False})
        rows.append((f"rebuild {r + 1} (force=true)", res, load()))
    traced = None
    if not args.no_trace:
        traced = run_child({"overrides": base, "force": True, "workers": args.workers, "trace": True})
        rows.append(("rebuild, line-traced", traced, load()))
    noop = run_child({"overrides": base, "force": False, "workers": args.workers, "trace": False})
    rows.append(("no-op re-run (manifest current)", noop, load()))
    cli = shutil.which("towerrec-prepare")
    if cli:
        cmd = [
            cli,
            *base,
            f"hydra.run.dir={tmp / 'hydra'}",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]
        res = run_process(cmd, parse=False)
        rows.append(("no-op, `towerrec-prepare` CLI", res, load()))

    counts = rows[0][1].get("counts", {})
    print(
        f"data: {counts.get('interactions', 0):,} interactions, {counts.get('items', 0):,} items "
        f"({counts.get('items_with_image', 0):,} images at {rows[0][1].get('images', {}).get('size')} px), "
        f"{counts.get('users', 0):,} users; workers={args.workers}\n"
    )
    print(
        "| run | process wall s | prepare() s | manifest `seconds` | child CPU s | peak RSS MB | load avg after |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, res, ld in rows:
        # A no-op leaves the manifest of the previous build in place: its seconds are not this run's.
        manifest_s = fmt(res.get("manifest_seconds"), 2) if name.startswith("rebuild") else "(previous build)"
        print(
            f"| {name} | {fmt(res['wall_s'], 2)} | {fmt(res.get('prepare_s'), 2)} | {manifest_s} | "
            f"{fmt(res['cpu_s'], 1)} | {fmt(res['peak_rss_mb'], 0)} | {ld} |"
        )
    rebuilds = [
        res["prepare_s"] for name, res, _ in rows if name.startswith("rebuild ") and "traced" not in name
    ]
    if rebuilds:
        best = min(rebuilds)
        print(
            f"\nbest rebuild {best:.2f} s; no-op prepare() {noop['prepare_s']:.3f} s "
            f"({100 * noop['prepare_s'] / best:.2f}% of a rebuild)"
        )
        print(
            f"untraced rebuilds: {', '.join(f'{x:.2f}' for x in rebuilds)} s (their spread is the noise floor)"
        )
        if traced is not None:
            print(
                f"traced rebuild / best untraced: x{traced['prepare_s'] / best:.2f} (tracing cost plus noise)"
            )
    phase_info = rows[0][1].get("phase_info")
    print(
        "manifest per-phase info: "
        + (json.dumps(phase_info) if phase_info else "none (the manifest records only the total `seconds`)")
    )
    if traced is not None:
        print_lines(traced, args.top)


# Users and items grow with the interactions, as a shop's do: (interactions, users, items, image px).
SCALES = {
    "1M": (1_000_000, 50_000, 5_000, 32),
    "10M": (10_000_000, 500_000, 50_000, 32),
    "100M": (100_000_000, 5_000_000, 200_000, 16),
}


def bench_synthetic(args: argparse.Namespace, tmp: Path) -> None:
    """Prepare the synthetic shop at each size in ``--sizes``, one child process each; one table."""
    print("\n## Synthetic prepare at scale (one child process per size; peak RSS is the child's own)\n")
    print(f"DuckDB memory limit: {args.memory_limit}; load average before: {load()}\n")
    rows = []
    for size in args.sizes:
        n, u, i, px = SCALES[size]
        out_dir = tmp / f"synthetic_{size}"
        overrides = [
            "data=synthetic",
            f"data.source.n_interactions={n}",
            f"data.source.n_users={u}",
            f"data.source.n_items={i}",
            f"data.image_size={px}",
            f"data.processed_dir={out_dir}",
            f"data.engine.memory_limit={args.memory_limit}",
        ] + args.synthetic_overrides
        res = run_child({"overrides": overrides, "force": True, "workers": args.workers, "trace": False})
        res["disk_mb"] = sum(p.stat().st_size for p in out_dir.iterdir()) / 2**20 if out_dir.exists() else 0
        rows.append((size, n, u, i, px, res, load()))
        shutil.rmtree(out_dir, ignore_errors=True)  # 100M rows take gigabytes
    print(
        "| interactions | users | items | image px | prepare s | child CPU s | peak RSS GB | "
        "processed MB | load avg after |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for _size, n, u, i, px, res, ld in rows:
        print(
            f"| {n:,} | {u:,} | {i:,} | {px} | {res['wall_s']:.1f} | {res['cpu_s']:.1f} | "
            f"{res['peak_rss_mb'] / 1024:.2f} | {res['disk_mb']:,.0f} | {ld} |"
        )
    by = {r[0]: r[5] for r in rows}
    if "100M" in by:
        peak = by["100M"]["peak_rss_mb"] / 1024
        print(
            f"\n100M peak RSS {peak:.2f} GB: {'PASS' if peak <= args.rss_target_gb else 'FAIL'} (<= {args.rss_target_gb:g} GB)"
        )
        if "10M" in by:
            ratio = by["100M"]["peak_rss_mb"] / by["10M"]["peak_rss_mb"]
            print(f"100M / 10M peak RSS: x{ratio:.2f}: {'PASS' if ratio <= 2 else 'FAIL'} (<= 2x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-hm", action="store_true", help="skip the H&M runs")
    p.add_argument("--skip-scale", action="store_true", help="skip the synthetic runs at scale")
    p.add_argument(
        "--sizes", type=lambda v: v.split(","), default=["1M", "10M", "100M"], help=f"of {', '.join(SCALES)}"
    )
    p.add_argument("--memory-limit", default="512MB", help="data.engine.memory_limit of the scale runs")
    p.add_argument("--repeats", type=int, default=2, help="H&M forced rebuilds")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (prepare.yaml: workers)")
    p.add_argument("--no-trace", action="store_true", help="skip the line-traced runs")
    p.add_argument("--top", type=int, default=15, help="lines shown in the traced breakdown")
    p.add_argument("--rss-target-gb", type=float, default=RSS_TARGET_GB)
    p.add_argument("--hm-overrides", nargs="*", default=[], help="extra config overrides for H&M")
    p.add_argument(
        "--synthetic-overrides", nargs="*", default=[], help="extra config overrides for the synthetic run"
    )
    p.add_argument("--tmp-dir", default=None, help="parent of the temporary processed folders")
    p.add_argument("--keep", action="store_true", help="keep the temporary processed folders")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child_main(json.loads(args.child))
        return

    tmp = Path(tempfile.mkdtemp(prefix="towerrec_bench_prepare_", dir=args.tmp_dir))
    print(
        f"# towerrec-prepare benchmark\n\nCPUs: {os.cpu_count()}, python {sys.version.split()[0]}, temp: {tmp}"
    )
    try:
        if not args.skip_hm:
            bench_hm(args, tmp)
        if not args.skip_scale:
            bench_synthetic(args, tmp)
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
