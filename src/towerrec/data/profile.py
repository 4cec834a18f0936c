"""A markdown report on a processed folder: sizes, sparsity, long tails, cold share and segments.

:func:`summarize` computes the headline numbers from the processed tables (``interactions.parquet``,
``items.parquet``, ``users.parquet``, ``manifest.json``); :func:`write_report` writes them to
``summary.json`` and ``report.md``, with PNG plots beside them::

    out_dir/
      report.md
      summary.json
      history_length.png   training interactions per user (log-x)
      item_popularity.png  interactions per item, sorted (log-log)
      cold_share.png       held-out interactions, targets and users touching cold items
      segments.png         lifecycle and RFM scores, all users vs test users

Held-out targets are distinct (user, item) pairs of a split, as in the evaluation, and a target
is cold when its item has no training interaction (``items.is_cold``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from towerrec.data.build import SPLITS, read_manifest
from towerrec.fileio import markdown_table

LIFECYCLE = ("new", "active", "lapsing", "no_history")
RFM = (("rfm_r", "R"), ("rfm_f", "F"), ("rfm_m", "M"))
HELD_OUT = ("val", "test")
TOP_SHARES = (0.01, 0.10)


# ----------------------------------------------------------------------------- numbers
def _share(part: float, whole: float) -> float:
    return float(part) / whole if whole else float("nan")


def _top_share(counts: np.ndarray, fraction: float) -> float:
    """Share of all interactions taken by the top ``fraction`` of the items in ``counts`` (at least one)."""
    if len(counts) == 0:
        return float("nan")
    top = np.sort(counts)[::-1][: max(1, math.ceil(fraction * len(counts)))]
    return _share(top.sum(), counts.sum())


def _cold_share(inter: pd.DataFrame, is_cold: np.ndarray, split: str) -> dict[str, Any]:
    """Held-out interactions, distinct targets and users of one split, and how many touch cold items."""
    held = inter.loc[inter["split"] == split, ["user_idx", "item_idx"]]
    cold = is_cold[held["item_idx"].to_numpy()]
    targets = held[~held.duplicated()]
    cold_t = is_cold[targets["item_idx"].to_numpy()]
    users_cold = targets.loc[cold_t, "user_idx"].nunique()
    n_users = targets["user_idx"].nunique()
    return {
        "interactions": len(held),
        "cold_interactions": int(cold.sum()),
        "cold_interaction_share": _share(cold.sum(), len(held)),
        "targets": len(targets),
        "cold_targets": int(cold_t.sum()),
        "cold_target_share": _share(cold_t.sum(), len(targets)),
        "users": int(n_users),
        "users_with_cold_target": int(users_cold),
        "users_with_cold_target_share": _share(users_cold, n_users),
    }


def _segment_counts(users: pd.DataFrame, test_users: np.ndarray) -> dict[str, dict[str, dict[str, int]]]:
    """Users per lifecycle stage and per R, F and M score: over all users and over the test users."""
    in_test = users["user_idx"].isin(test_users)
    out: dict[str, dict[str, dict[str, int]]] = {}
    columns = [("lifecycle", list(LIFECYCLE))] + [(c, [1, 2, 3, 0]) for c, _ in RFM]
    for col, levels in columns:
        if col not in users:
            continue
        extra = sorted(set(users[col].dropna().unique()) - set(levels), key=str)
        order = levels + extra
        out[col] = {
            group: {
                str(k): int(v)
                for k, v in users.loc[mask, col].value_counts().reindex(order, fill_value=0).items()
            }
            for group, mask in (("all", slice(None)), ("test_users", in_test))
        }
    return out


def _jsonable(x: Any) -> Any:
    """NaN (a share of nothing) -> None, so summary.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return None if isinstance(x, float) and x != x else x


def _summarize(processed_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The headline numbers, and the per-user and per-item arrays the plots need."""
    manifest = read_manifest(processed_dir)
    if manifest is None:
        raise FileNotFoundError(f"{processed_dir}: no manifest.json; run towerrec-prepare first")
    inter = pd.read_parquet(
        processed_dir / "interactions.parquet", columns=["user_idx", "item_idx", "timestamp", "split"]
    )
    items = pd.read_parquet(processed_dir / "items.parquet", columns=["item_idx", "is_cold", "has_image"])
    users = pd.read_parquet(processed_dir / "users.parquet")

    n_users, n_items, n_inter = len(users), len(items), len(inter)
    # Lookup tables indexed by item_idx (ids are contiguous from 1; row 0 is padding).
    is_cold = np.zeros(n_items + 1, dtype=bool)
    is_cold[items["item_idx"].to_numpy()] = items["is_cold"].to_numpy(dtype=bool)
    has_image = np.zeros(n_items + 1, dtype=bool)
    has_image[items["item_idx"].to_numpy()] = items["has_image"].to_numpy(dtype=bool)
    item_counts = np.bincount(inter["item_idx"].to_numpy(), minlength=n_items + 1)[1:]
    train_counts = np.bincount(
        inter.loc[inter["split"] == "train", "item_idx"].to_numpy(), minlength=n_items + 1
    )[1:]
    interacted = item_counts > 0
    split_counts = inter["split"].value_counts().reindex(list(SPLITS), fill_value=0)
    by_split = inter.groupby("split", observed=True)["timestamp"].agg(["min", "max"])
    n_train = users["n_train"].to_numpy()
    with_history = n_train[n_train > 0]
    test_users = inter.loc[inter["split"] == "test", "user_idx"].unique()
    start, end = inter["timestamp"].min(), inter["timestamp"].max()

    summary = {
        "name": manifest.get("name"),
        "processed_dir": str(processed_dir),
        "users": n_users,
        "items": n_items,
        "items_never_interacted": int((~interacted).sum()),
        "cold_items": int(is_cold[1:].sum()),
        "interactions": n_inter,
        "splits": {s: int(split_counts[s]) for s in SPLITS},
        "distinct_user_item_pairs": int((~inter.duplicated(["user_idx", "item_idx"])).sum()),
        "sparsity": 1.0 - _share(n_inter, n_users * n_items),
        "date_range": {
            "start": str(start.date()),
            "end": str(end.date()),
            "span_days": int((end - start).days) + 1,
        },
        "split_dates": {
            s: {"start": str(r["min"].date()), "end": str(r["max"].date())} for s, r in by_split.iterrows()
        },
        "split": manifest.get("split", {}),
        "skipped": manifest.get("skipped", {}),
        "repaired": manifest.get("repaired", {}),
        "filtered": manifest.get("filtered", {}),
        "image_coverage": {
            "items": _share(has_image[1:].sum(), n_items),
            "interacted_items": _share((has_image[1:] & interacted).sum(), interacted.sum()),
            "interactions": _share(has_image[inter["item_idx"].to_numpy()].sum(), n_inter),
        },
        "history": {
            "users_without_train": int((n_train == 0).sum()),
            "median": float(np.median(with_history)) if len(with_history) else 0.0,
            "mean": float(with_history.mean()) if len(with_history) else 0.0,
            "p90": float(np.percentile(with_history, 90)) if len(with_history) else 0.0,
            "max": int(n_train.max(initial=0)),
        },
        "popularity": {
            "items_interacted": int(interacted.sum()),
            **{f"top_{round(f * 100)}pct_share": _top_share(item_counts[interacted], f) for f in TOP_SHARES},
            "items_interacted_once": int((item_counts == 1).sum()),
            "max": int(item_counts.max(initial=0)),
        },
        "cold": {s: _cold_share(inter, is_cold, s) for s in HELD_OUT},
        "segments": _segment_counts(users, test_users),
    }
    arrays = {
        "n_train": n_train,
        "item_counts": item_counts,
        "train_counts": train_counts,
        "test_n_train": users.loc[users["user_idx"].isin(test_users), "n_train"].to_numpy(),
    }
    return summary, arrays


def summarize(processed_dir: str | Path) -> dict[str, Any]:
    """Headline numbers of a processed folder, computed from its tables (what summary.json holds)."""
    return _summarize(Path(processed_dir))[0]


# ----------------------------------------------------------------------------- plots
def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.4, 4.2)) -> tuple[Figure, Any]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend state
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _plot_history(s: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> None:
    n_train, test_n = arrays["n_train"], arrays["test_n_train"]
    fig, ax = _figure()
    ax = ax[0, 0]
    hi = max(int(n_train.max(initial=1)), 2)
    bins = np.unique(np.round(np.logspace(0, math.log10(hi + 1), 30)))
    ax.hist(n_train[n_train > 0], bins=bins, color="tab:blue", alpha=0.75, label="all users")
    ax.hist(test_n[test_n > 0], bins=bins, histtype="step", lw=2, color="tab:red", label="test users")
    ax.set_xscale("log")
    ax.set_xlabel("training interactions per user (log scale)")
    ax.set_ylabel("users")
    h = s["history"]
    ax.axvline(h["median"], color="k", ls="--", lw=1, label=f"median {h['median']:g}")
    ax.set_title(
        f"History length ({h['users_without_train']:,} users without training history not shown)", fontsize=10
    )
    ax.legend()
    fig.savefig(path, dpi=120)


def _plot_popularity(s: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> None:
    fig, ax = _figure()
    ax = ax[0, 0]
    for key, label, colour in (
        ("item_counts", "all interactions", "tab:blue"),
        ("train_counts", "train split", "tab:orange"),
    ):
        counts = np.sort(arrays[key])[::-1]
        counts = counts[counts > 0]
        ax.loglog(np.arange(1, len(counts) + 1), counts, color=colour, label=label)
    p = s["popularity"]
    for f, ls in zip(TOP_SHARES, (":", "--"), strict=True):
        k = max(1, math.ceil(f * p["items_interacted"]))
        share = p[f"top_{round(f * 100)}pct_share"]
        ax.axvline(k, color="grey", ls=ls, lw=1, label=f"top {f:.0%} of items: {share:.1%} of interactions")
    ax.set_xlabel("item rank (log scale)")
    ax.set_ylabel("interactions (log scale)")
    ax.set_title(f"Item popularity: {p['items_interacted']:,} interacted items", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def _plot_cold(s: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> None:
    fig, ax = _figure()
    ax = ax[0, 0]
    measures = (
        ("cold_interaction_share", "interactions"),
        ("cold_target_share", "distinct targets"),
        ("users_with_cold_target_share", "users with ≥1 cold target"),
    )
    x = np.arange(len(HELD_OUT))
    width = 0.8 / len(measures)
    for j, (key, label) in enumerate(measures):
        vals = [s["cold"][sp][key] for sp in HELD_OUT]
        bars = ax.bar(x + (j - 1) * width, np.nan_to_num(vals), width, label=label)
        ax.bar_label(bars, labels=[f"{v:.0%}" if v == v else "–" for v in vals], fontsize=8)
    ax.set_xticks(x, [f"{sp} ({s['cold'][sp]['interactions']:,} interactions)" for sp in HELD_OUT])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share that is cold")
    ax.set_title("Held-out data on items without training interactions", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=120)


def _plot_segments(s: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> None:
    segs = s["segments"]
    fig, axes = _figure(2, 2, size=(9.0, 6.5))
    titles = {
        "lifecycle": "lifecycle stage",
        "rfm_r": "R (recency) score",
        "rfm_f": "F (frequency) score",
        "rfm_m": "M (monetary) score",
    }
    for ax, col in zip(axes.ravel(), titles, strict=True):
        if col not in segs:
            ax.set_axis_off()
            continue
        levels = list(segs[col]["all"])
        x = np.arange(len(levels))
        for j, (group, colour) in enumerate((("all", "tab:blue"), ("test_users", "tab:red"))):
            counts = np.array([segs[col][group][k] for k in levels], dtype=float)
            shares = counts / counts.sum() if counts.sum() else counts
            bars = ax.bar(x + (j - 0.5) * 0.4, shares, 0.4, color=colour, label=group.replace("_", " "))
            ax.bar_label(bars, labels=[f"{int(c):,}" for c in counts], fontsize=7)
        ax.set_xticks(x, ["0 (none)" if k == "0" else k for k in levels])
        ax.set_ylabel("share of group")
        ax.set_title(titles[col], fontsize=10)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Customer segments (bar labels are user counts)", fontsize=11)
    fig.savefig(path, dpi=120)


PLOTS = {
    "history_length.png": _plot_history,
    "item_popularity.png": _plot_popularity,
    "cold_share.png": _plot_cold,
    "segments.png": _plot_segments,
}


# ----------------------------------------------------------------------------- markdown
def _pct(x: float) -> str:
    return "–" if x != x else f"{x:.1%}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    # Cells are formatted strings already: keep them as written.
    return markdown_table(pd.DataFrame([[str(c) for c in r] for r in rows], columns=header), numparse=False).splitlines()


def _reasons(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in d.items()) if d else "none"


def _headline(s: dict[str, Any]) -> list[str]:
    """The title, the headline table of sizes and the split dates."""
    sp, split = s["splits"], s["split"]
    if split.get("method") == "temporal":
        cut = f"temporal: val from {split.get('val_start')}, test from {split.get('test_start')}"
    else:
        cut = f"{split.get('method')} ({split.get('users_too_short', 0):,} users too short to hold out)"
    img = s["image_coverage"]
    rows = [
        ["users", f"{s['users']:,}"],
        [
            "items",
            f"{s['items']:,} ({s['items_never_interacted']:,} never interacted, {s['cold_items']:,} cold)",
        ],
        [
            "interactions",
            f"{s['interactions']:,} ({s['distinct_user_item_pairs']:,} distinct user–item pairs)",
        ],
        *[[f"{k} interactions", f"{sp[k]:,} ({_pct(_share(sp[k], s['interactions']))})"] for k in SPLITS],
        ["sparsity", f"{s['sparsity']:.5f}"],
        [
            "date range",
            f"{s['date_range']['start']} to {s['date_range']['end']} ({s['date_range']['span_days']:,}-day span)",
        ],
        ["split", cut],
        ["skipped rows", _reasons(s["skipped"])],
        ["repaired rows", _reasons(s["repaired"])],
        ["filtered rows", _reasons(s["filtered"])],
        [
            "image coverage",
            f"{_pct(img['items'])} of items, {_pct(img['interacted_items'])} of interacted items, "
            f"{_pct(img['interactions'])} of interactions",
        ],
    ]
    lines = [
        f"# Data report: {s['name']}",
        "",
        f"Processed folder: `{s['processed_dir']}`",
        "",
        "## Headline",
        "",
        *_table(["", "value"], rows),
        "",
    ]
    if s["split_dates"]:
        lines += _table(
            ["split", "first", "last"], [[k, v["start"], v["end"]] for k, v in s["split_dates"].items()]
        ) + [""]
    return lines


def _distributions(s: dict[str, Any]) -> list[str]:
    """History lengths and item popularity, with their plots."""
    h, p = s["history"], s["popularity"]
    return [
        "## History length",
        "",
        f"Training interactions per user: median {h['median']:g}, mean {h['mean']:.1f}, 90th percentile "
        f"{h['p90']:g}, max {h['max']:,}; {h['users_without_train']:,} users have no training interaction.",
        "",
        "![history length](history_length.png)",
        "",
        "## Item popularity",
        "",
        f"Of the {p['items_interacted']:,} items with at least one interaction, the top 1% take "
        f"{_pct(p['top_1pct_share'])} of all interactions and the top 10% take {_pct(p['top_10pct_share'])}; "
        f"{p['items_interacted_once']:,} items were interacted with once. The most popular item has {p['max']:,}.",
        "",
        "![item popularity](item_popularity.png)",
        "",
        "## Cold items in the held-out splits",
        "",
        "A held-out interaction is cold when its item has no training interaction; targets are the "
        "distinct (user, item) pairs of a split, as in the evaluation.",
        "",
    ]


def _cold(s: dict[str, Any]) -> list[str]:
    """The cold share of each held-out split."""
    c = s["cold"]
    lines = _table(
        ["", *HELD_OUT],
        [
            ["interactions", *(f"{c[k]['interactions']:,}" for k in HELD_OUT)],
            [
                "cold interactions",
                *(
                    f"{c[k]['cold_interactions']:,} ({_pct(c[k]['cold_interaction_share'])})"
                    for k in HELD_OUT
                ),
            ],
            ["distinct targets", *(f"{c[k]['targets']:,}" for k in HELD_OUT)],
            [
                "cold targets",
                *(f"{c[k]['cold_targets']:,} ({_pct(c[k]['cold_target_share'])})" for k in HELD_OUT),
            ],
            ["users", *(f"{c[k]['users']:,}" for k in HELD_OUT)],
            [
                "users with ≥1 cold target",
                *(
                    f"{c[k]['users_with_cold_target']:,} ({_pct(c[k]['users_with_cold_target_share'])})"
                    for k in HELD_OUT
                ),
            ],
        ],
    )
    return [*lines, "", "![cold share](cold_share.png)", ""]


def _segments(s: dict[str, Any]) -> list[str]:
    """Each customer-segment column: users and test users per level."""
    lines = [
        "## Customer segments",
        "",
        "Computed from training data only (see `customer_segments` in `towerrec.data.build`); "
        "the evaluation slices test metrics by them. Score 0 means no training history.",
        "",
    ]
    for col, segs in s["segments"].items():
        levels = list(segs["all"])
        n_all, n_test = sum(segs["all"].values()), sum(segs["test_users"].values())
        lines += _table(
            [col, "users", "share", "test users", "share of test users"],
            [
                [
                    k,
                    f"{segs['all'][k]:,}",
                    _pct(_share(segs["all"][k], n_all)),
                    f"{segs['test_users'][k]:,}",
                    _pct(_share(segs["test_users"][k], n_test)),
                ]
                for k in levels
            ],
        ) + [""]
    return [*lines, "![segments](segments.png)", ""]


def _markdown(s: dict[str, Any]) -> str:
    return "\n".join([*_headline(s), *_distributions(s), *_cold(s), *_segments(s)])


def write_report(processed_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``report.md``, ``summary.json`` and the PNG plots of a processed folder into ``out_dir``.

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, arrays = _summarize(Path(processed_dir))
    for name, plot in PLOTS.items():
        plot(summary, arrays, out_dir / name)
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
    report = out_dir / "report.md"
    report.write_text(_markdown(summary))
    return report
