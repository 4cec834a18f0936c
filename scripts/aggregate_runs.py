"""Aggregate a Hydra multirun folder into one table (markdown on stdout, summary.csv beside it).

    python scripts/aggregate_runs.py multirun/train/2026-11-22_10-00-00 [--slices all,cold_items]

Each job folder holds ``metrics.json`` (towerrec-train's results record) and ``.hydra/overrides.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from towerrec.evaluation.results import ResultsError, read_results


def collect(sweep_dir: Path, slices: list[str], metrics: list[str]) -> pd.DataFrame:
    rows = []
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        job = path.parent
        m = read_results(path)
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        swept = [o for o in overrides if "=" in o and not o.startswith(("data.", "hydra.", "paths."))]
        row = {"job": job.name, "overrides": " ".join(swept), "seed": m.run.get("seed")}
        row.update({f"val_{k}": v for k, v in m.val.items()})
        test = m.scores()
        for sl in slices:
            for met in metrics:
                row[f"{sl}/{met}"] = test.get(sl, {}).get(met)
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--slices", default="all,warm_items,cold_items")
    ap.add_argument("--metrics", default="recall@20,ndcg@20")
    args = ap.parse_args()
    try:
        df = collect(args.sweep_dir, args.slices.split(","), args.metrics.split(","))
    except ResultsError as err:
        raise SystemExit(f"error: {err}") from None
    if df.empty:
        raise SystemExit(f"{args.sweep_dir}: no */metrics.json found")
    df.to_csv(args.sweep_dir / "summary.csv", index=False)
    print(df.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else df.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
