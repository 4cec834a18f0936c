"""Benchmark the index configs: build time, size, recall@k against exact search, and query speed.

Each config in ``configs/index/`` is built twice over the same vectors: once through the export code
(:func:`towerrec.retrieval.index.build_index`, searched through :func:`towerrec.retrieval.index.search`)
and once with the raw FAISS calls for the same factory string, so the ratios show what the project's
wrappers cost (targets: build <= 1.1x raw, query <= 1.2x raw).

    python scripts/bench_index.py                      # 1M random unit vectors, d=64, every config
    python scripts/bench_index.py --n 200000 --configs hnsw ivf_pq
    python scripts/bench_index.py --n 200000 --export exports/hnsw --sweep-ef 128,256,512

    python scripts/bench_index.py --scale --n 10000000 --configs auto --workdir /tmp/<you>/bench
        # each build in a child process (peak RSS by os.wait4), random and clustered catalogues
        # memory-mapped from --workdir, tuned to target_recall, beside raw FAISS with the same setting
    python scripts/bench_index.py --crossover 1000,3000,10000,30000   # Flat vs tuned HNSW (auto.yaml)

Random unit vectors in 64-d have no cluster structure, so they are a hard case for every ANN index;
real item embeddings (``--export``) are easier. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import OmegaConf

from towerrec import CONFIG_DIR
from towerrec.retrieval.index import (
    IndexSpec,
    ann_recall,
    build_index,
    exact_search,
    normalized,
    search,
    set_params,
    training_sample,
)

CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "index").glob("*.yaml"))
MIN_SECONDS = 0.5  # each timing lasts at least this long (see time_queries)


def load_spec(name: str) -> IndexSpec:
    return instantiate(OmegaConf.load(Path(CONFIG_DIR) / "index" / f"{name}.yaml"))


def time_queries(
    searchers: list, queries: np.ndarray, n_single: int, repeat: int, min_seconds: float = MIN_SECONDS
) -> list[tuple[float, float]]:
    """(single-query QPS, batched QPS) of each searcher, best of ``repeat`` runs each.

    Each run times at least ``n_single`` single queries and one pass of the batch, and goes on (the
    same queries again) until ``min_seconds`` have passed: a batch of 2,000 fast queries takes 0.1 s,
    too short a timing for a shared machine (one such timing made a 10M-item batch look 0.4x of raw).
    The searchers take turns within each run, so a machine that gets busier or quieter part way
    through slows them alike and the ratios stay fair. Single queries run on one OpenMP thread: for one
    query FAISS's thread start-up costs more than it saves, and on a busy machine it makes timings
    swing by 10x. Batches use every thread.
    """
    single = [[] for _ in searchers]
    batched = [[] for _ in searchers]
    threads = faiss.omp_get_max_threads()
    n_single = max(1, min(n_single, len(queries)))
    for _ in range(repeat):
        for j, search_one in enumerate(searchers):
            faiss.omp_set_num_threads(1)
            done, t = 0, time.perf_counter()
            while done < n_single or time.perf_counter() - t < min_seconds:
                i = done % n_single
                search_one(queries[i : i + 1])
                done += 1
            single[j].append(done / (time.perf_counter() - t))
            faiss.omp_set_num_threads(threads)
            done, t = 0, time.perf_counter()
            while done == 0 or time.perf_counter() - t < min_seconds:
                search_one(queries)
                done += len(queries)
            batched[j].append(done / (time.perf_counter() - t))
    return [(max(s), max(b)) for s, b in zip(single, batched, strict=True)]


def raw_build(
    factory: str, spec: IndexSpec, x: np.ndarray, ids: np.ndarray, sample: np.ndarray
) -> faiss.Index:
    """The plain FAISS calls for one factory string."""
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    space = faiss.ParameterSpace()
    for name, value in spec.build_params.items():
        space.set_index_parameter(index, name, value)
    if not index.is_trained:
        index.train(sample)
    index.add_with_ids(x, ids)
    for name, value in spec.search_params.items():
        space.set_index_parameter(index, name, value)
    return index


def bench_config(name, x, ids, queries, exact, args) -> list[dict]:
    spec = load_spec(name)
    t = time.perf_counter()
    built = build_index(spec, x, ids)
    build_s = time.perf_counter() - t
    index = built.index
    row = {"index": name, "factory": built.factory, "build_s": build_s}
    row["size_mb"] = faiss.serialize_index(index).nbytes / 2**20 if args.size else float("nan")
    row["recall"] = ann_recall(search(index, queries, args.k)[1], exact, args.k)
    searchers = [lambda q: search(index, q, args.k)]
    if not args.skip_raw:
        sample = training_sample(x, spec.train_sample, spec.seed)  # what build_index trains on
        t = time.perf_counter()
        raw = raw_build(row["factory"], built.spec, x, ids, sample)
        row["raw_build_s"] = time.perf_counter() - t
        row["raw_recall"] = ann_recall(raw.search(queries, args.k)[1], exact, args.k)
        searchers.append(lambda q: raw.search(q, args.k))
    timings = time_queries(searchers, queries, args.single, args.repeat, args.min_seconds)
    row["qps1"], row["qpsb"] = timings[0]
    if not args.skip_raw:
        row["raw_qps1"], row["raw_qpsb"] = timings[1]
    rows = [row]
    if args.sweep_ef and "HNSW" in built.factory:
        for ef in args.sweep_ef:
            set_params(index, {"efSearch": ef})
            recall = ann_recall(search(index, queries, args.k)[1], exact, args.k)
            ((qps1, qpsb),) = time_queries(
                [lambda q: search(index, q, args.k)], queries, args.single, 1, args.min_seconds
            )
            rows.append({"index": f"{name} efSearch={ef}", "recall": recall, "qps1": qps1, "qpsb": qpsb})
    return rows


def bench_loaded_export(path: Path, queries, exact, args) -> dict:
    """The export folder's own index as saved: ItemIndex.search against raw faiss.read_index."""
    from towerrec.retrieval import load_export
    from towerrec.retrieval.load import search_params_of

    item_index = load_export(path)
    m = item_index.manifest
    row = {
        "index": f"{m['index']['name']} (as exported)",
        "factory": m["factory"],
        "build_s": m["build_seconds"],
    }
    row["size_mb"] = m["files"]["index.faiss"]["bytes"] / 2**20
    row["recall"] = ann_recall(item_index.search(queries, args.k)[1], exact, args.k)
    raw = faiss.read_index(str(path / "index.faiss"))
    set_params(raw, search_params_of(m))  # the export's operating point, as load_export applies it
    row["raw_recall"] = ann_recall(raw.search(queries, args.k)[1], exact, args.k)
    searchers = [lambda q: item_index.search(q, args.k), lambda q: raw.search(q, args.k)]
    (row["qps1"], row["qpsb"]), (row["raw_qps1"], row["raw_qpsb"]) = time_queries(
        searchers, queries, args.single, args.repeat, args.min_seconds
    )
    return row


def crossover(sizes: list[int], d: int, k: int, target: float, seed: int) -> str:
    """Exact ``Flat`` against ``HNSW32,Flat`` tuned to ``target`` on clustered catalogues of each size:
    single-threaded ms per query (the serving cost), for ``factory: auto``'s ``flat_below``."""
    from towerrec.retrieval.tune import measure, tune
    from towerrec.retrieval.vectors import clustered_unit

    rows = []
    for n in sizes:
        x = clustered_unit(n + 500, d, seed=seed)
        held_out, x = x[n:], x[:n]  # queries not in the catalogue (as user queries are) and items
        ids = np.arange(1, n + 1)
        items = x[np.random.default_rng(seed).choice(n, 500, replace=False)]
        sets = {"user": (held_out, exact_search(x, ids, held_out, k)), "item": (items, exact_search(x, ids, items, k))}
        flat = build_index(IndexSpec("flat", "Flat", gpu=False), x, ids).index
        t = time.perf_counter()
        graph = build_index(IndexSpec("hnsw", "HNSW32,Flat", gpu=False), x, ids).index
        build_s = time.perf_counter() - t
        tuned = tune(graph, sets, k, target)
        exact = min((measure(flat, sets, k, {}) for _ in range(3)), key=lambda p: p.seconds)
        graph_point = min((measure(graph, sets, k, tuned.chosen.params) for _ in range(3)), key=lambda p: p.seconds)
        ms_flat = 1000 * exact.seconds / exact.queries
        ms_graph = 1000 * graph_point.seconds / graph_point.queries
        rows.append({
            "items": f"{n:,}", "flat ms/query": f"{ms_flat:.3f}", "HNSW32 efSearch": f"{tuned.chosen.params['efSearch']:g}",
            "HNSW recall (user, item)": f"{graph_point.recall['user']:.3f}, {graph_point.recall['item']:.3f}",
            "HNSW ms/query": f"{ms_graph:.3f}", "flat / HNSW time": f"{ms_flat / ms_graph:.2f}", "HNSW build s": f"{build_s:.1f}",
        })  # fmt: skip
        print(f"  {rows[-1]}", flush=True)
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------- --scale: one child process per build
HNSW_MAX = 2_000_000  # an HNSW build above this takes over an hour on 2 cores: reported, not run


def catalogue_file(workdir: Path, catalog: str, n: int, d: int, n_queries: int, seed: int) -> Path:
    """``n + n_queries`` unit vectors of one catalogue law in a .npy (written once, in chunks): the
    first ``n`` are indexed, the rest are held-out queries (as user queries are not catalogue items)."""
    from numpy.lib.format import open_memmap

    from towerrec.retrieval.vectors import clustered_unit, random_unit

    path = workdir / f"{catalog}_{n}x{d}_s{seed}.npy"
    if not path.exists():
        make = clustered_unit if catalog == "clustered" else random_unit
        tmp = path.with_suffix(".tmp.npy")
        out = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n + n_queries, d))
        chunk = 1_000_000
        if catalog == "clustered":  # one law for every chunk: the same centres (seed), other noise
            out[:] = make(n + n_queries, d, seed=seed)
        else:
            for i, start in enumerate(range(0, n + n_queries, chunk)):
                out[start : start + chunk] = make(min(chunk, n + n_queries - start), d, seed=seed * 1000 + i)
        out.flush()
        del out
        tmp.rename(path)
    return path


def child_main(job: dict) -> None:
    """Build one index over the memory-mapped catalogue, in this (child) process; print one JSON line."""
    import json

    from towerrec.retrieval.tune import measure, set_search_params, tune

    xq = np.load(job["vectors"], mmap_mode="r")
    n = job["n"]
    x = xq[:n]
    ids = np.arange(1, n + 1)
    q = np.load(job["queries"])
    sets = {"user": (q["held_out"], q["exact_held_out"]), "item": (q["items"], q["exact_items"])}
    spec = load_spec(job["config"]).resolve(n, x.shape[1])
    t = time.perf_counter()
    if job["side"] == "project":
        built = build_index(spec, x, ids)
        index, factory = built.index, built.factory
        build_s = time.perf_counter() - t
        if spec.target_recall is not None:
            params = tune(index, sets, job["k"], spec.target_recall, f"index={job['config']}").chosen.params
        else:
            params = dict(spec.search_params)
        set_search_params(index, params)
    else:  # the plain FAISS calls for the same factory string, training sample and search setting
        factory, params = job["factory"], job["params"]
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(training_sample(x, spec.train_sample, spec.seed))
        index.add_with_ids(np.ascontiguousarray(x), ids)
        build_s = time.perf_counter() - t
        set_search_params(index, params)
    point = measure(index, sets, job["k"], params, timed=job["single"])
    path = Path(job["index_file"])
    faiss.write_index(index, str(path))
    all_q = np.concatenate([q["held_out"], q["items"]])
    searcher = (lambda v: search(index, v, job["k"])) if job["side"] == "project" else (lambda v: index.search(v, job["k"]))
    ((qps1, qpsb),) = time_queries([searcher], all_q, job["single"], job["repeat"], job["min_seconds"])
    print(json.dumps({
        "factory": factory, "params": params, "build_s": build_s, "size_mb": path.stat().st_size / 2**20,
        "recall_user": point.recall["user"], "recall_item": point.recall["item"], "qps1": qps1, "qpsb": qpsb,
    }))  # fmt: skip
    path.unlink()


def run_child(job: dict) -> dict:
    """``job`` in a child process; its result with its peak RSS (``os.wait4``)."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                          os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"child {job['side']} {job['config']} failed ({status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": usage.ru_maxrss / 1024}


def scale(args) -> str:
    """Project build (``build_index`` + tuned operating point) beside the raw FAISS calls, per catalogue."""
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for catalog in args.catalogs:
        t = time.perf_counter()
        vec_path = catalogue_file(workdir, catalog, args.n, args.d, args.queries, args.seed)
        xq = np.load(vec_path, mmap_mode="r")
        x, held_out = xq[: args.n], np.array(xq[args.n :])
        ids = np.arange(1, args.n + 1)
        items = np.array(x[np.sort(np.random.default_rng(args.seed).choice(args.n, args.queries, replace=False))])
        q_path = workdir / f"{vec_path.stem}_queries.npz"
        np.savez(q_path, held_out=held_out, items=items, exact_held_out=exact_search(x, ids, held_out, args.k),
                 exact_items=exact_search(x, ids, items, args.k))  # fmt: skip
        label = f"{catalog} {args.n:,} x {args.d}"
        print(f"{label}: vectors and exact top-{args.k} in {time.perf_counter() - t:.1f}s", flush=True)
        for name in args.configs:
            spec = load_spec(name).resolve(args.n, args.d)
            factory = spec.factory_string()
            if "HNSW" in factory and args.n > HNSW_MAX:
                rows.append({"data": label, "index": name, "factory": f"{factory}: not run (HNSW build > 1 h here)"})
                continue
            job = {"vectors": str(vec_path), "queries": str(q_path), "n": args.n, "config": name, "k": args.k,
                   "single": args.single, "repeat": args.repeat, "min_seconds": args.min_seconds, "index_file": str(workdir / f"{name}.faiss")}  # fmt: skip
            mine = run_child({**job, "side": "project"})
            raw = run_child({**job, "side": "raw", "factory": mine["factory"], "params": mine["params"]})
            rows.append({"data": label, "index": name, "mine": mine, "raw": raw})
            print(f"  {name}: {mine}\n  raw: {raw}", flush=True)
        if not args.keep:
            vec_path.unlink()
            q_path.unlink()
    head = ["data", "index", "factory", "setting", "build s", "raw build s", "build ratio", "peak RSS MB",
            "raw peak RSS MB", "size MB", f"recall@{args.k} user", "item", "raw recall user", "1-query QPS",
            "raw 1-query QPS", "query ratio", "batch QPS", "raw batch QPS", "batch ratio"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "mine" not in r:
            lines.append("| " + " | ".join([r["data"], r["index"], r["factory"]] + [""] * (len(head) - 3)) + " |")
            continue
        m, w = r["mine"], r["raw"]
        setting = ", ".join(f"{k}={v:g}" for k, v in m["params"].items()) or "exact"
        cells = [r["data"], r["index"], m["factory"], setting, fmt(m["build_s"], ".1f"), fmt(w["build_s"], ".1f"),
                 fmt(m["build_s"] / w["build_s"], ".2f"), fmt(m["peak_rss_mb"], ".0f"), fmt(w["peak_rss_mb"], ".0f"),
                 fmt(m["size_mb"], ".0f"), fmt(m["recall_user"], ".4f"), fmt(m["recall_item"], ".4f"),
                 fmt(w["recall_user"], ".4f"), fmt(m["qps1"], ".0f"), fmt(w["qps1"], ".0f"),
                 fmt(w["qps1"] / m["qps1"], ".2f"), fmt(m["qpsb"], ".0f"), fmt(w["qpsb"], ".0f"),
                 fmt(w["qpsb"] / m["qpsb"], ".2f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return format(value, spec)


def table(rows: list[dict], k: int) -> str:
    head = [
        "data", "index", "factory", "build s", "raw build s", "build ratio", "size MB", f"recall@{k}",
        "raw recall", "1-query QPS", "raw 1-query QPS", "query ratio", "batch QPS", "raw batch QPS", "batch ratio",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        raw_b, raw_1, raw_q = r.get("raw_build_s"), r.get("raw_qps1"), r.get("raw_qpsb")
        cells = [
            r["data"], r["index"], r.get("factory", ""), fmt(r.get("build_s"), ".1f"), fmt(raw_b, ".1f"),
            fmt(r["build_s"] / raw_b if raw_b and r.get("build_s") and "raw_build_s" in r else None, ".2f"),
            fmt(r.get("size_mb"), ".1f"), fmt(r["recall"], ".4f"), fmt(r.get("raw_recall"), ".4f"),
            fmt(r["qps1"], ".0f"), fmt(raw_1, ".0f"), fmt(raw_1 / r["qps1"] if raw_1 else None, ".2f"),
            fmt(r["qpsb"], ".0f"), fmt(raw_q, ".0f"), fmt(raw_q / r["qpsb"] if raw_q else None, ".2f"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="random unit vectors (0: skip them)")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and batched QPS")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--repeat", type=int, default=3, help="timing runs; the best is kept")
    p.add_argument("--min-seconds", type=float, default=MIN_SECONDS,
                   help="each timing goes on (repeating the queries) until this long")  # fmt: skip
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)  # --scale: e.g. auto ivf_flat
    p.add_argument("--export", type=Path, help="also bench on this export folder's item embeddings")
    p.add_argument("--sweep-ef", type=lambda s: [int(v) for v in s.split(",")], default=[],
                   help="HNSW: also report recall and QPS at these efSearch values")  # fmt: skip
    p.add_argument("--skip-raw", action="store_true", help="only the export code path")
    p.add_argument("--no-size", dest="size", action="store_false", help="skip serialising for the size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crossover", type=lambda s: [int(v) for v in s.split(",")], default=[],
                   help="only compare exact Flat with HNSW tuned to --target on clustered catalogues of these sizes")  # fmt: skip
    p.add_argument("--target", type=float, default=0.95, help="--crossover: the recall@k HNSW is tuned to")
    p.add_argument("--scale", action="store_true",
                   help="each build in a child process (peak RSS by os.wait4) over memory-mapped catalogues, "
                   "tuned to the config's target_recall, beside raw FAISS calls")  # fmt: skip
    p.add_argument("--catalogs", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp") / "towerrec_bench_index",
                   help="--scale: where the vectors and indexes go (deleted afterwards unless --keep)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="--scale: keep the vector files for another run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        import json

        child_main(json.loads(args.child))
        return
    if args.scale:
        print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; each build in its own process")
        print(scale(args))
        return
    if args.crossover:
        print(f"faiss {faiss.__version__}; single-threaded search, clustered catalogues, d={args.d}")
        print(crossover(args.crossover, args.d, args.k, args.target, args.seed))
        return
    rng = np.random.default_rng(args.seed)
    datasets = []
    if args.n:
        x = normalized(rng.standard_normal((args.n, args.d), dtype=np.float32))
        q = normalized(rng.standard_normal((args.queries, args.d), dtype=np.float32))
        datasets.append((f"random {args.n:,} x {args.d}", x, np.arange(1, args.n + 1), q, None))
    if args.export is not None:
        x = normalized(np.load(args.export / "item_embeddings.npy"))
        ids = pd.read_parquet(args.export / "item_ids.parquet")["item_idx"].to_numpy()
        q = x[np.sort(rng.choice(len(x), min(args.queries, len(x)), replace=False))]
        datasets.append((f"export {args.export.name} ({len(x):,} x {x.shape[1]})", x, ids, q, args.export))

    rows = []
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, GPUs visible: {faiss.get_num_gpus()}"
    )
    for label, x, ids, queries, export in datasets:
        t = time.perf_counter()
        exact = exact_search(x, ids, queries, args.k)
        print(
            f"{label}: exact top-{args.k} for {len(queries)} queries in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
        for name in args.configs:
            for row in bench_config(name, x, ids, queries, exact, args):
                rows.append({"data": label, **row})
                print(f"  {row['index']}: recall {row['recall']:.4f}", flush=True)
        if export is not None:
            rows.append({"data": label, **bench_loaded_export(export, queries, exact, args)})
    print()
    print(table(rows, args.k))


if __name__ == "__main__":
    main()
