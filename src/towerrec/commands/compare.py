"""``towerrec-compare A B``: paired comparison of two scorers evaluated on the same split.

A and B are per-user result files (or the folders holding them): a ``towerrec-train`` run folder
(``test_per_user.parquet``), a ``towerrec-eval`` output or one scorer's folder in it. For every metric
and the ``all``, ``warm_items`` and ``cold_items`` slices it prints, over the users both have, the mean
of A - B, its 95% paired-bootstrap interval and a paired sign-flip p-value
(:mod:`towerrec.evaluation.stats`), and marks A better, worse or not distinguishable from B.

    towerrec-compare outputs/train/2026-01-01/12-00-00 outputs/eval/popularity
    towerrec-compare runA runB --metrics recall@20,ndcg@20,map@12 --json compare.json

Results of different data (config hashes) or splits are refused: their users are not paired.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from towerrec.evaluation.evaluator import ITEM_SLICES
from towerrec.evaluation.per_user import read_per_user
from towerrec.evaluation.stats import ALPHA, N_FLIPS, N_RESAMPLES, compare_per_user
from towerrec.fileio import markdown_table, write_json


def _identity(meta: dict) -> str:
    return f"{meta['split']} split of {meta['data']['name']} (data hash {meta['data']['config_hash']})"


def compare(
    a: str | Path, b: str | Path, metrics: list[str] | None = None, slices=ITEM_SLICES, split: str = "test", **kwargs
) -> tuple[pd.DataFrame, dict, dict]:
    """Paired differences A - B per (slice, metric), and the two files' identities.

    Raises:
        ValueError: the files are not per-user results, or were scored on different data or splits.
    """
    frame_a, meta_a = read_per_user(a, split)
    frame_b, meta_b = read_per_user(b, split)
    same = meta_a["split"] == meta_b["split"] and meta_a["data"]["config_hash"] == meta_b["data"]["config_hash"]
    if not same:
        raise ValueError(f"A ({a}) is the {_identity(meta_a)}, B ({b}) the {_identity(meta_b)}: not paired")
    table = compare_per_user(frame_a, frame_b, slices, metrics, **kwargs)
    if table.empty:
        raise ValueError(f"A ({a}) and B ({b}) share no metric column in the slices {', '.join(slices)}")
    return table, meta_a, meta_b


def format_comparison(table: pd.DataFrame, name_a: str, name_b: str, alpha: float = ALPHA) -> str:
    """A markdown table: one row per (slice, metric)."""

    rows = [
        {
            "slice": r.slice,
            "metric": r.metric,
            "users": r.users,
            name_a: r.mean_a,
            name_b: r.mean_b,
            "A - B": r.mean_diff,
            "95% interval": None if r.lo != r.lo else f"[{r.lo:+.4f}, {r.hi:+.4f}]",
            "p": r.p_value,
            f"at {alpha}": r.verdict,
        }
        for r in table.itertuples()
    ]
    return markdown_table(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="towerrec-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="per-user results of A (a parquet file or a folder holding one)")
    parser.add_argument("b", help="per-user results of B, scored on the same split")
    parser.add_argument("--metrics", help="comma-separated metric@k names (default: every one both have)")
    parser.add_argument("--slices", default=",".join(ITEM_SLICES), help="comma-separated slices")
    parser.add_argument("--split", default="test", help="the split whose file a folder is searched for")
    parser.add_argument("--flips", type=int, default=N_FLIPS, help="random sign patterns of the p-value")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples of the interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=ALPHA, help="level for better / worse")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metrics = args.metrics.split(",") if args.metrics else None
    try:
        table, meta_a, meta_b = compare(
            args.a,
            args.b,
            metrics,
            args.slices.split(","),
            args.split,
            n_flips=args.flips,
            n_resamples=args.resamples,
            seed=args.seed,
            alpha=args.alpha,
        )
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"towerrec-compare: {err}")
    name_a, name_b = f"A: {meta_a['model']}", f"B: {meta_b['model']}"
    print(f"A - B on the {_identity(meta_a)}; A = {args.a}, B = {args.b}")
    print(f"paired over users: bootstrap {args.resamples:,} resamples, sign-flip {args.flips:,} patterns, seed {args.seed}")
    print(format_comparison(table, name_a, name_b, args.alpha))
    if args.json:
        write_json(args.json, {"a": {"path": str(args.a), **meta_a}, "b": {"path": str(args.b), **meta_b}, "rows": table.to_dict("records")})


if __name__ == "__main__":
    main()
