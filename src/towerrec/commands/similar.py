"""``towerrec-similar``: query an export folder, item -> similar items or purchase history -> items.

towerrec-similar --export exports/hnsw --item S000123 -k 10
towerrec-similar --export exports/hnsw --history S000001,S000042 --json
towerrec-similar --export exports/hnsw --item S000123 --grid similar.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from towerrec.fileio import markdown_table
from towerrec.retrieval import ExportError, UnknownItemError, load_export


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="towerrec-similar", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--export", required=True, help="export folder written by towerrec-export")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--item", help="raw item id: find similar items")
    query.add_argument("--history", type=_ids, help="comma-separated raw item ids, oldest first: recommend")
    p.add_argument("--exclude", type=_ids, default=[], help="comma-separated raw item ids to leave out")
    p.add_argument("-k", type=int, default=10, help="results (default 10)")
    p.add_argument("--keep-history", action="store_true", help="history queries: allow history items back")
    p.add_argument("--checkpoint", help="history queries: the checkpoint, when it moved since export")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--grid", metavar="PNG", help="also draw the query and results into this PNG")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums (sizes are still checked)")
    p.add_argument("--gpu", default="false", help="search on GPU: auto | true | false (default false)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("-k must be at least 1")
    return args


def _table(hits: list[dict]) -> str:
    rows = [
        {
            "#": rank,
            "item_id": h["item_id"],
            "score": h["score"],
            "cold": "cold" if h["is_cold"] else "",
            "title": h["title"],
            **({"because": h["because"]} if "because" in h else {}),
        }
        for rank, h in enumerate(hits, 1)
    ]
    return markdown_table(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        index = load_export(args.export, verify=not args.no_verify, gpu=args.gpu)
        if args.item is not None:
            hits = index.similar_items(args.item, k=args.k, exclude=args.exclude)
            q = index.describe(args.item)
            query = {"item_id": q.item_id, "title": q.title, "image": q.image, "is_cold": q.is_cold}
            query_ids = [args.item]
        else:
            from towerrec.retrieval.recommend import Recommender  # the model code: history queries only

            hits = Recommender(index, args.checkpoint).recommend(
                args.history, k=args.k, exclude=args.exclude, exclude_history=not args.keep_history
            )
            query = {"history": args.history}
            query_ids = args.history
    except (ExportError, UnknownItemError, ValueError) as err:
        sys.exit(f"error: {err}")

    results = [h.to_dict() for h in hits]
    if args.json:
        print(json.dumps({"query": query, "exclude": args.exclude, "results": results}, indent=2))
    else:
        label = f"item {args.item}" if args.item is not None else f"history {','.join(args.history)}"
        print(f"{label} -> top {len(results)} from {index.root} ({index.manifest['factory']})")
        print(_table(results))
    if args.grid:
        from towerrec.retrieval.grid import result_grid, save_grid

        kind = "similar to" if args.item is not None else "recommended for"
        fig = result_grid(index, query_ids, hits, title=f"{kind} {', '.join(query_ids)[:80]}")
        path = save_grid(fig, args.grid)
        print(f"grid: {path}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
