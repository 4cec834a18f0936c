"""Benchmark full-ranking evaluation against the floor: a bare ``users @ items.T`` + ``torch.topk``.

For each catalogue size, random unit vectors (users and items) are ranked three ways, in one run:

* **bare**: ``users @ items.T`` and ``torch.topk`` per chunk of users, nothing else, timed with
  ``--bare-chunk`` users per chunk (1,024, as in issue 12) and with score_topk's own chunk size; the
  faster of the two is the floor;
* **score_topk**: :func:`towerrec.ranking.score_topk` as evaluation calls it: seen items
  masked (``--seen`` random items per user), PAD masked, ties broken along the fixed tie order and the
  result made deterministic;
* the same with ``shuffle_ties=False`` (ties by lower index, as the baselines rank).

They take turns within each repeat (bare, score_topk, shuffle_ties=False, then again), so a
machine that another process makes busier or quieter slows them alike; each figure is the best of
``--repeat``. Prints a markdown table (users/s and the ratio to the floor; target <= 1.2x).

    python scripts/bench_eval.py                              # 25k items x 8,192 users, 1M x 1,024
    python scripts/bench_eval.py --sizes 100000:2048 --repeat 5
    python scripts/bench_eval.py --device cuda                # the same code on a GPU

Threads: ``torch.set_num_threads(--threads)`` (2 by default, the reference machine). OpenBLAS
environment variables (OPENBLAS_NUM_THREADS and the like) may be set on the machine running this; the
script leaves them as they are, since they govern only libraries other than torch's own BLAS.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from towerrec.fileio import markdown_table
from towerrec.ranking import chunk_rows, score_topk


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_topk(users: torch.Tensor, items: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """The floor: one matrix product and one ``torch.topk`` per chunk of users."""
    item_t = items.T
    return torch.cat([(users[s : s + chunk_size] @ item_t).topk(k, dim=1).indices for s in range(0, len(users), chunk_size)])


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def bench(n_items: int, n_users: int, args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    users = F.normalize(torch.randn(n_users, args.dim, generator=g), dim=-1).to(device)
    items = F.normalize(torch.randn(n_items, args.dim, generator=g), dim=-1).to(device)
    rows = torch.arange(n_users).repeat_interleave(args.seen).to(device)
    seen = (rows, torch.randint(1, n_items, (len(rows),), generator=g).to(device))
    chunk = args.chunk or chunk_rows(n_items)
    runs = {
        "bare": lambda: bare_topk(users, items, args.k, chunk),
        "bare_fixed": lambda: bare_topk(users, items, args.k, args.bare_chunk),
        "shuffled": lambda: score_topk(users, items, args.k, seen=seen, chunk_size=args.chunk),
        "by_index": lambda: score_topk(users, items, args.k, seen=seen, chunk_size=args.chunk, shuffle_ties=False),
    }
    score_topk(users[:8], items, args.k, seen=None)  # warm-up (tie order cached, allocator)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, fn in runs.items():  # interleaved: each repeat times all of them back to back
            best[name] = min(best[name], timed(fn, device))
    floor = n_users / min(best["bare"], best["bare_fixed"])  # the faster chunking is the floor
    ours = n_users / best["shuffled"]
    by_index = n_users / best["by_index"]
    return {
        "catalog": f"{n_items:,} items",
        "users": f"{n_users:,}",
        "bare matmul + topk (users/s)": f"{floor:,.0f}",
        f"bare, {args.bare_chunk}-user chunks": f"{n_users / best['bare_fixed']:,.0f}",
        "bare, score_topk's chunks": f"{n_users / best['bare']:,.0f}",
        "score_topk (users/s)": f"{ours:,.0f}",
        "ratio": f"{floor / ours:.2f}x",
        "shuffle_ties=False (users/s)": f"{by_index:,.0f}",
        "ratio, shuffle_ties=False": f"{floor / by_index:.2f}x",
        "score_topk chunk": f"{chunk:,}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25000:8192,1000000:1024", help="items:users pairs")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seen", type=int, default=10, help="seen items masked per user")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bare-chunk", type=int, default=1024, help="users per chunk of the fixed bare loop")
    parser.add_argument("--chunk", type=int, default=None, help="score_topk's chunk (default: its memory budget)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for pair in args.sizes.split(","):
        n_items, n_users = (int(x) for x in pair.split(":"))
        rows.append(bench(n_items, n_users, args, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"d={args.dim}, k={args.k}, {args.seen} seen items per user, best of {args.repeat}, {name}, torch {torch.__version__}")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
