"""``towerrec-audience``: the customers most likely to buy a product (or a campaign of products).

towerrec-audience --export exports/hnsw --item S000123 -k 1000 --out audience.csv
towerrec-audience --export exports/hnsw --item S000123 --item S000124 --aggregate mean -k 500
towerrec-audience --export exports/hnsw --campaign S000123 --campaign S000200,S000201 -k 500 \\
    --max-per-customer 1 --exclude-file opt_outs.txt --segment lifecycle=active --out audiences.parquet

The export must hold its customers (``towerrec-export ... users=true``). Writes one row per customer
per campaign: campaign, rank, customer_id, score, segment (lifecycle stage), rfm_segment.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from towerrec.retrieval import ExportError
from towerrec.retrieval.customers import (
    AGGREGATES,
    AudienceError,
    Campaign,
    Filters,
    load_audiences,
    parse_segments,
    read_opt_outs,
)


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="towerrec-audience", description=__doc__.split("\n")[0].split(": ", 1)[1]
    )
    p.add_argument("--export", required=True, help="export folder written by towerrec-export ... users=true")
    p.add_argument(
        "--item", action="append", default=[], help="raw item id of the campaign (repeat for several items)"
    )
    p.add_argument("--campaign", action="append", type=_ids, default=[],
                   help="one campaign of a batch: comma-separated raw item ids (repeat per campaign)")  # fmt: skip
    p.add_argument("-k", type=int, default=100, help="customers per campaign (default 100)")
    p.add_argument("--aggregate", choices=AGGREGATES, default="max",
                   help="score of a customer for a several-item campaign: the best or mean match (default max)")  # fmt: skip
    p.add_argument(
        "--exclude-file",
        help="opt-out list: .txt (one customer id a line), .csv or .parquet (customer_id column)",
    )
    p.add_argument(
        "--include-buyers", action="store_true", help="keep customers who already bought a campaign item"
    )
    p.add_argument("--segment", action="append", default=[],
                   help="keep only this prepared segment: lifecycle=active, rfm_r=3, R3F3M3 ... (repeat: "
                   "values of one column are alternatives, columns must all match)")  # fmt: skip
    p.add_argument(
        "--max-per-customer", type=int, help="across the campaigns: audiences per customer at most"
    )
    p.add_argument("--out", help="write the audience here (.csv or .parquet); default: CSV on stdout")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums (sizes are still checked)")
    args = p.parse_args(argv)
    if args.item and args.campaign:
        p.error("give --item (one campaign) or --campaign (a batch), not both")
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".parquet"):
        p.error(f"--out {args.out}: the file must end in .csv or .parquet")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        groups = args.campaign if args.campaign else [args.item]
        campaigns = [Campaign(items, args.k) for items in groups]
        filters = Filters(
            exclude=read_opt_outs(args.exclude_file) if args.exclude_file else set(),
            exclude_buyers=not args.include_buyers,
            segments=parse_segments(args.segment),
        )
        audiences = load_audiences(args.export, verify=not args.no_verify)
        table = audiences.batch(campaigns, filters, args.aggregate, args.max_per_customer)
    except (ExportError, AudienceError) as err:
        sys.exit(f"error: {err}")
    if args.out is None:
        table.to_csv(sys.stdout, index=False)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        table.to_parquet(out, index=False)
    else:
        table.to_csv(out, index=False)
    sizes = table.groupby("campaign", sort=False).size()
    print(f"{out}: {len(table)} rows, " + ", ".join(f"{c} {n}" for c, n in sizes.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
