"""Offline evaluation of audiences: for each item bought in the evaluation window, rank the customers.

The question of a campaign is the transpose of a recommendation: for one item, which customers will buy
it? :func:`audience_task` takes the evaluation window's purchases (the test split, after the history
up to its cut) and keeps every item bought there by at least ``min_buyers`` customers who were active
before the window; for each such item a scorer ranks **all** those customers, and the window's actual
buyers are the relevant ones. Customers who bought the item before the window are left out of the
ranking and of the buyers by default (``exclude_buyers``), as ``towerrec-audience`` leaves them out.

Per item: ``precision@K`` (buyers among the top K, over K), ``recall@K`` (over the item's buyers) and
``lift@K`` (precision over the buyers' share of the customers, 1 = random), for K as counts (``@100``)
and as shares of the customer base (``@1%``). Slices ``all``, ``warm_items`` and ``cold_items`` are
masks over the per-item values; paired tests over items (:func:`~towerrec.evaluation.stats.paired_difference`)
compare the model with each baseline on the same items.

Scorers (``fit(task, dm)``, then ``score(item_rows) -> (b, C)`` scores, higher first), ties broken along
a fixed random customer order:

- :class:`TwoTowerAudience`: the user tower over each customer's history before the window, against the
  item tower (the same embeddings ``towerrec-audience`` searches);
- :class:`RFMAudience`: the classic campaign list, the top customers by R + F + M score (quantile
  scores from the history before the window), the same for every item;
- :class:`CategoryAffinity`: customers who bought the item's category (``product_code`` on H&M) most;
- :class:`CustomerPopularity`: customers with the most purchases;
- :class:`RandomAudience`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from towerrec.data.splits import history_splits
from towerrec.evaluation.stats import paired_difference
from towerrec.fileio import markdown_table

log = logging.getLogger(__name__)

SLICES = ("all", "warm_items", "cold_items")
METRICS = ("precision", "recall", "lift")


@dataclass
class AudienceTask:
    """The items of an evaluation window and the customers to rank for each.

    ``customers`` are the user indices of the customers active before the window (the ranked set);
    ``buyers[i]`` and ``past[i]`` are rows of ``customers``: the window's buyers of ``items[i]`` and
    those who bought it before the window.
    """

    split: str
    items: np.ndarray  # (I,) item_idx
    is_cold: np.ndarray  # (I,) bool, no training interaction
    customers: np.ndarray  # (C,) user_idx
    buyers: list[np.ndarray]
    past: list[np.ndarray]
    history: pd.DataFrame  # the interactions before the window's cut (sorted by user, then time)
    window_start: pd.Timestamp
    exclude_buyers: bool

    def __len__(self) -> int:
        return len(self.items)


def _groups(rows: np.ndarray, items: np.ndarray, wanted: np.ndarray) -> list[np.ndarray]:
    """For each of ``wanted`` items, the distinct ``rows`` paired with it."""
    pairs = pd.DataFrame({"r": rows, "i": items}).drop_duplicates()
    by_item = pairs.groupby("i")["r"].apply(lambda s: np.sort(s.to_numpy()))
    return [by_item.get(i, np.empty(0, dtype=np.int64)) for i in wanted]


def audience_task(dm, split: str = "test", min_buyers: int = 3, exclude_buyers: bool = True) -> AudienceTask:
    """The audience task of ``split``'s window from a set-up DataModule.

    Args:
        dm: a set-up :class:`~towerrec.data.datamodule.SequenceDataModule`.
        split: the evaluation window (``test`` or ``val``); the history is what precedes its cut.
        min_buyers: keep items bought in the window by at least this many ranked customers.
        exclude_buyers: leave out (of the ranking and the buyers) customers who bought the item before.
    """
    inter = dm.interactions
    which = inter["split"].to_numpy()
    history = inter[np.isin(which, history_splits(split))]
    window = inter[which == split]
    customers = np.unique(history["user_idx"].to_numpy())
    row_of = pd.Series(np.arange(len(customers)), index=customers)
    window = window[window["user_idx"].isin(customers).to_numpy()]
    w_rows = row_of.loc[window["user_idx"].to_numpy()].to_numpy()
    w_items = window["item_idx"].to_numpy()
    candidates = np.unique(w_items)
    buyers = _groups(w_rows, w_items, candidates)
    h_in = history[history["item_idx"].isin(candidates).to_numpy()]
    past = _groups(
        row_of.loc[h_in["user_idx"].to_numpy()].to_numpy(), h_in["item_idx"].to_numpy(), candidates
    )
    if exclude_buyers:
        buyers = [np.setdiff1d(b, p, assume_unique=True) for b, p in zip(buyers, past, strict=True)]
    keep = np.array([len(b) >= min_buyers for b in buyers], dtype=bool)
    items = candidates[keep]
    is_cold = dm.item_features.is_cold.numpy()[items]
    start = (
        pd.Timestamp(dm.manifest["split"][f"{split}_start"])
        if f"{split}_start" in dm.manifest["split"]
        else None
    )
    log.info(
        "%s window: %d items with >= %d buyers, %d customers ranked",
        split,
        len(items),
        min_buyers,
        len(customers),
    )
    return AudienceTask(
        split=split,
        items=items,
        is_cold=is_cold,
        customers=customers,
        buyers=[b for b, k in zip(buyers, keep, strict=True) if k],
        past=[p for p, k in zip(past, keep, strict=True) if k],
        history=history,
        window_start=start if start is not None else history["timestamp"].max(),
        exclude_buyers=exclude_buyers,
    )


# ----------------------------------------------------------------------------- metrics
def cutoffs(n_customers: int, ks: list[int], shares: list[float]) -> dict[str, int]:
    """``{label: K}``: counts (``"100"``) and shares of the customer base (``"1%"``, at least 1)."""
    out = {str(int(k)): int(k) for k in ks}
    for s in shares:
        out[f"{100 * s:g}%"] = max(1, int(round(s * n_customers)))
    return out


def audience_metrics(
    ranked: np.ndarray, buyers: list[np.ndarray], n_ranked: np.ndarray, cuts: dict[str, int]
) -> dict[str, np.ndarray]:
    """Per-item ``precision@K``, ``recall@K`` and ``lift@K``.

    Args:
        ranked: ``(I, Kmax)`` customer rows, best first (-1 past the end of a short ranking).
        buyers: per item, the rows of its actual buyers.
        n_ranked: ``(I,)`` customers ranked per item (the base rate's denominator).
        cuts: ``{label: K}``; K above the ranked customers counts what there is.

    Returns:
        ``{"precision@<label>": (I,), ...}``; precision divides by K (a list of K customers).
    """
    out: dict[str, np.ndarray] = {}
    hit = np.zeros(ranked.shape, dtype=bool)
    for i, b in enumerate(buyers):
        hit[i] = np.isin(ranked[i], b) & (ranked[i] >= 0)
    cum = np.concatenate([np.zeros((len(ranked), 1)), np.cumsum(hit, axis=1)], axis=1)  # (I, Kmax+1)
    n_buyers = np.array([len(b) for b in buyers], dtype=np.float64)
    base = n_buyers / np.maximum(n_ranked, 1)
    for label, k in cuts.items():
        hits = cum[:, min(k, ranked.shape[1])]
        out[f"precision@{label}"] = hits / k
        out[f"recall@{label}"] = hits / np.maximum(n_buyers, 1)
        out[f"lift@{label}"] = out[f"precision@{label}"] / np.where(base > 0, base, np.nan)
    return out


def customer_tie_order(n: int, seed: int = 0) -> np.ndarray:
    """A fixed random order of ``n`` customers: ties in a score go along it, not the id order."""
    return np.random.default_rng(seed).permutation(n)


def rank_customers(scorer, task: AudienceTask, k: int, chunk: int = 256, seed: int = 0) -> np.ndarray:
    """``(I, k)`` customer rows per item, best first; past buyers masked when the task says so."""
    n = len(task.customers)
    k = min(k, n)
    perm = customer_tie_order(n, seed)
    n_items = len(task.items)
    out = np.full((n_items, k), -1, dtype=np.int64)
    for start in range(0, n_items, chunk):
        rows = np.arange(start, min(start + chunk, n_items))
        scores = np.array(scorer.score(rows), dtype=np.float64)  # (b, C), a copy
        if task.exclude_buyers:
            for j, r in enumerate(rows):
                scores[j, task.past[r]] = -np.inf
        s = scores[:, perm]
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # ties: along perm
        ranked = perm[order]
        ranked[np.take_along_axis(s, order, axis=1) == -np.inf] = -1
        out[rows] = ranked
    return out


def per_item_frame(task: AudienceTask, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per item: ``item_idx``, ``is_cold``, ``buyers`` and ``<slice>/<metric>@K`` (NaN outside the slice)."""
    cols = {"item_idx": task.items, "is_cold": task.is_cold, "buyers": [len(b) for b in task.buyers]}
    masks = {
        "all": np.ones(len(task.items), dtype=bool),
        "warm_items": ~task.is_cold,
        "cold_items": task.is_cold,
    }
    for sl, m in masks.items():
        for name, v in values.items():
            cols[f"{sl}/{name}"] = np.where(m, v, np.nan)
    return pd.DataFrame(cols)


def summarize(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{slice: {"items": n, metric@K: mean}}`` of a per-item frame (NaN for an empty slice)."""
    out = {}
    for sl in SLICES:
        cols = [c for c in frame if c.startswith(f"{sl}/")]
        sub = frame[cols]
        n = int(sub.notna().any(axis=1).sum()) if cols else 0
        out[sl] = {
            "items": n,
            **{c.split("/", 1)[1]: (float(sub[c].mean()) if n else math.nan) for c in cols},
        }
    return out


def paired_tests(
    frames: dict[str, pd.DataFrame], reference: str, metrics: list[str], seed: int = 0
) -> pd.DataFrame:
    """``reference`` against every other scorer, paired over the same items, per slice and metric."""
    rows = []
    a = frames[reference]
    for other, b in frames.items():
        if other == reference:
            continue
        for sl in SLICES:
            for m in metrics:
                col = f"{sl}/{m}"
                d = paired_difference(
                    a[col].to_numpy(), b[col].to_numpy(), n_resamples=2000, n_flips=10_000, seed=seed
                )
                rows.append({"a": reference, "b": other, "slice": sl, "metric": m, **d.as_dict()})
    return pd.DataFrame(rows)


def format_audience_table(results: dict[str, dict[str, dict[str, float]]], metrics: list[str]) -> str:
    rows = [
        {"scorer": name, "slice": sl, "items": v["items"], **{m: v.get(m, math.nan) for m in metrics}}
        for name, res in results.items()
        for sl, v in res.items()
    ]
    return markdown_table(pd.DataFrame(rows, columns=["scorer", "slice", "items", *metrics]))


# ----------------------------------------------------------------------------- scorers
class AudienceScorer:
    """Scores every ranked customer for items of a task: ``fit(task, dm)``, then ``score(item_rows)``."""

    name = "scorer"

    def fit(self, task: AudienceTask, dm) -> AudienceScorer:
        self.task = task
        return self

    def score(self, item_rows: np.ndarray) -> np.ndarray:  # (b, C)
        raise NotImplementedError


def _customer_rows(task: AudienceTask, user_idx: np.ndarray) -> np.ndarray:
    return pd.Series(np.arange(len(task.customers)), index=task.customers).loc[user_idx].to_numpy()


class CustomerPopularity(AudienceScorer):
    """Customers with the most purchases before the window, the same list for every item."""

    name = "customer_popularity"

    def fit(self, task, dm):
        super().fit(task, dm)
        rows = _customer_rows(task, task.history["user_idx"].to_numpy())
        self.counts = np.bincount(rows, minlength=len(task.customers)).astype(np.float64)
        return self

    def score(self, item_rows):
        return np.broadcast_to(self.counts, (len(item_rows), len(self.counts)))


class RandomAudience(AudienceScorer):
    """Uniform random scores (a fixed seed)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, task, dm):
        super().fit(task, dm)
        self.rng = np.random.default_rng(self.seed)
        return self

    def score(self, item_rows):
        return self.rng.random((len(item_rows), len(self.task.customers)))


class RFMAudience(AudienceScorer):
    """The classic campaign list: R + F + M quantile scores (1..3 each) from the history before the
    window, highest first; ties by spend. The same list for every item.

    R is days from the last purchase to the window's start (recent = 3), F distinct purchase days, M the
    summed spend (price x quantity, else purchases), as :func:`towerrec.data.build.customer_segments`
    computes them for the prepared segments, here at the window's cut.
    """

    name = "rfm"

    def fit(self, task, dm):
        import duckdb

        from towerrec.data.build import customer_segments, user_activity

        super().fit(task, dm)
        n_users = int(dm.users["user_idx"].max())
        h = task.history
        rows = pd.DataFrame(
            {
                "user_idx": h["user_idx"].to_numpy(),
                "ts": h["timestamp"].to_numpy(dtype="datetime64[ns]").view("i8"),
            }
        )
        for c in ("price", "quantity"):
            if c in h:
                rows[c] = h[c].to_numpy()
        rows["split"] = 0  # the history before the window plays the training split
        with duckdb.connect() as con:
            con.register("history", rows)
            activity = user_activity(con, "history")  # the prepared segments' own aggregates
        seg = customer_segments(activity, n_users, task.window_start, 60, 60).set_index("user_idx")
        seg = seg.reindex(task.customers)
        rfm = (seg["rfm_r"] + seg["rfm_f"] + seg["rfm_m"]).to_numpy(dtype=np.float64)
        spend = seg["monetary"].rank(pct=True).fillna(0).to_numpy(dtype=np.float64)  # in (0, 1]: a tie-break
        self.scores = rfm + 0.5 * spend
        return self

    def score(self, item_rows):
        return np.broadcast_to(self.scores, (len(item_rows), len(self.scores)))


class CategoryAffinity(AudienceScorer):
    """Customers who bought the item's category most: purchases before the window of items sharing the
    item's value of ``fields[0]``, ties by ``fields[1]`` (and so on), then by all purchases.

    Args:
        fields: categorical item fields, most specific first; None: ``product_code`` and
            ``product_type_name`` where the data has them (H&M), else its first two fields.
    """

    name = "category_affinity"

    def __init__(self, fields: list[str] | None = None) -> None:
        self.fields = list(fields) if fields else None

    def fit(self, task, dm):
        super().fit(task, dm)
        names = list(dm.manifest["features"]["categorical"])
        fields = self.fields or (
            [f for f in ("product_code", "product_type_name") if f in names] or names[:2]
        )
        unknown = [f for f in fields if f not in names]
        if unknown:
            raise ValueError(
                f"category_affinity fields {unknown} are not categorical fields of the data ({names})"
            )
        self.used = fields
        cat = dm.item_features.categorical.numpy()  # (N+1, F), 0 = unknown
        rows = _customer_rows(task, task.history["user_idx"].to_numpy())
        hist_items = task.history["item_idx"].to_numpy()
        c = len(task.customers)
        self.matrices, self.values = [], []
        for f in fields:
            j = names.index(f)
            codes = cat[hist_items, j]
            m = sp.csc_matrix((np.ones(len(rows)), (rows, codes)), shape=(c, int(cat[:, j].max()) + 1))
            self.matrices.append(m)
            self.values.append(cat[task.items, j])
        self.total = np.bincount(rows, minlength=c).astype(np.float64)
        return self

    def score(self, item_rows):
        # Lexicographic: each level's integer counts dominate the finer levels, scaled below 1.
        s = np.broadcast_to(self.total, (len(item_rows), len(self.total))).astype(np.float64)
        for m, v in zip(reversed(self.matrices), reversed(self.values), strict=True):
            codes = v[item_rows]
            counts = m[:, codes].toarray().T  # (b, C)
            counts = np.where(codes[:, None] > 0, counts, 0)  # unknown value: no affinity
            s = counts + s / (s.max(initial=0) + 1)  # the finer levels only break this level's ties
        return s


class TwoTowerAudience(AudienceScorer):
    """The trained two towers: each customer's history before the window through the user tower
    (:meth:`~towerrec.models.two_tower.TwoTowerModule.user_embeddings`, as validation ranks), scored
    against the item tower's embedding of each item (cold items from their image and content)."""

    name = "two_tower"

    def __init__(self, model, chunk_size: int = 1024) -> None:
        self.model = model
        self.chunk_size = chunk_size

    @torch.no_grad()
    def fit(self, task, dm):
        from towerrec.retrieval.writer import customer_histories

        super().fit(task, dm)
        self.model.eval()
        item_emb = self.model.item_tower.embed_all()  # (N+1, D)
        hist = torch.from_numpy(customer_histories(task.history, task.customers, int(dm.max_history)))
        users = [
            self.model.user_embeddings(hist[i : i + self.chunk_size].to(item_emb.device), item_emb)
            .float()
            .cpu()
            for i in range(0, len(hist), self.chunk_size)
        ]
        self.users = torch.cat(users).numpy()  # (C, D)
        self.item_vecs = (
            item_emb[torch.from_numpy(task.items).to(item_emb.device)].float().cpu().numpy()
        )  # (I, D)
        return self

    def score(self, item_rows):
        return self.item_vecs[item_rows] @ self.users.T


class BlendAudience(AudienceScorer):
    """A weighted average of other scorers' per-item rank percentiles: ``sum_j w_j * pct_j``.

    Each member's scores for an item become the customers' rank percentiles (average ranks for ties,
    in (0, 1]), so scales do not matter and a member's ties stay ties. The members are fitted scorers
    of the same task; :func:`choose_blend` picks the weights on the validation window.
    """

    name = "blend"

    def __init__(self, members: dict[str, AudienceScorer], weights: dict[str, float]) -> None:
        self.members = members
        self.weights = {n: float(w) for n, w in weights.items() if w}
        if not self.weights:
            raise ValueError("task.blend: every weight is 0")

    def fit(self, task, dm):  # the members are fitted on the same task by the caller
        return super().fit(task, dm)

    def score(self, item_rows):
        from scipy.stats import rankdata

        total = np.zeros((len(item_rows), len(self.task.customers)))
        for name, w in self.weights.items():
            scores = np.asarray(self.members[name].score(item_rows), dtype=np.float64)
            total += w * rankdata(scores, axis=1, method="average") / scores.shape[1]
        return total


def simplex_grid(names: list[str], step: float) -> list[dict[str, float]]:
    """Every weighting of ``names`` on a grid of ``step`` whose weights sum to 1."""
    n = round(1 / step)
    if not math.isclose(n * step, 1.0) or n < 1:
        raise ValueError(f"task.blend.step must divide 1, got {step}")

    def parts(k: int, total: int):
        if k == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in parts(k - 1, total - first):
                yield (first, *rest)

    return [{m: c / n for m, c in zip(names, combo, strict=True)} for combo in parts(len(names), n)]


def choose_blend(
    members: dict[str, AudienceScorer], task: AudienceTask, dm, step: float, cut: str, seed: int = 0
) -> tuple[dict[str, float], pd.DataFrame]:
    """The blend weights with the highest mean ``recall@<cut>`` on ``task`` (the validation window);
    ties go to the earlier grid point, which weighs the first member (the model) most.

    Returns:
        The weights and a frame of every grid point's validation recall.
    """
    for scorer in members.values():
        scorer.fit(task, dm)
    cuts = _cut(cut, len(task.customers))
    n_ranked = _n_ranked(task)
    rows = []
    for weights in simplex_grid(list(members), step):
        blend = BlendAudience(members, weights).fit(task, dm)
        ranked = rank_customers(blend, task, max(cuts.values()), seed=seed)
        recall = audience_metrics(ranked, task.buyers, n_ranked, cuts)[f"recall@{cut}"]
        rows.append({**weights, f"val recall@{cut}": float(np.mean(recall))})
    grid = pd.DataFrame(rows)
    best = grid.iloc[int(grid[f"val recall@{cut}"].to_numpy().argmax())]
    return {m: float(best[m]) for m in members}, grid


def _cut(label: str, n_customers: int) -> dict[str, int]:
    """``{label: K}`` for one cut-off label (``"100"`` or ``"5%"``)."""
    if label.endswith("%"):
        return cutoffs(n_customers, [], [float(label[:-1]) / 100])
    return cutoffs(n_customers, [int(label)], [])


def _n_ranked(task: AudienceTask) -> np.ndarray:
    """Customers ranked per item: all, less the item's past buyers when they are left out."""
    return np.array([len(task.customers) - (len(p) if task.exclude_buyers else 0) for p in task.past])


# ----------------------------------------------------------------------------- the task of towerrec-eval
def _audience_scorers(cfg) -> tuple[dict[str, AudienceScorer], object]:
    """The scorers of ``towerrec-eval task=audience`` (the checkpoint's model, ``cfg.task.baselines``) and
    the DataModule they score (the checkpoint's, else ``cfg.datamodule`` over the prepared data)."""
    from hydra.utils import instantiate

    scorers: dict[str, AudienceScorer] = {}
    if cfg.ckpt_path is not None:
        from towerrec.models.checkpoint import load_trained

        model, dm = load_trained(cfg.ckpt_path, device=cfg.device, force=cfg.get("force", False))
        scorers["two_tower"] = TwoTowerAudience(model, cfg.chunk_size)
    else:
        from towerrec.data.build import ensure_prepared

        ensure_prepared(cfg.data, workers=cfg.workers)
        dm = instantiate(cfg.datamodule)
        dm.setup()
    for name, sub in (cfg.task.get("baselines") or {}).items():
        scorers[name] = instantiate(sub)
    if not scorers:
        raise ValueError("task=audience: nothing to evaluate (no ckpt_path and no task.baselines)")
    return scorers, dm


def audience_frames(cfg) -> tuple[dict[str, pd.DataFrame], dict]:
    """Rank the customers of ``cfg.split``'s audience task with the model (``ckpt_path``), the
    baselines of ``cfg.task`` and, when ``task.blend`` names members, their blend with the model.

    Returns:
        Each scorer's per-item frame (the same items in the same order) and the run's metadata.
    """
    t = cfg.task
    if cfg.data.get("split", {}).get("method") == "rolling" and cfg.data.split.get("fold") is None:
        raise ValueError("audience_frames runs on one split: pick a fold (data.split.fold=N)")
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {cfg.split!r}")
    scorers, dm = _audience_scorers(cfg)
    task = audience_task(dm, cfg.split, int(t.min_buyers), bool(t.exclude_buyers))
    if len(task) == 0:
        raise ValueError(
            f"no item was bought by {t.min_buyers}+ customers in the {cfg.split} window: lower task.min_buyers"
        )
    meta: dict = {}
    blend = t.get("blend") or {}
    if blend.get("members") and "two_tower" in scorers:
        scorers["blend"], meta["blend"] = _fit_blend(cfg, dm, scorers)
    cuts = cutoffs(len(task.customers), list(t.ks), list(t.shares))
    n_ranked = _n_ranked(task)
    frames = {}
    for name, scorer in scorers.items():  # the blend comes last: its members are fitted on this task by then
        log.info("audience: ranking %d customers for %d items with %s", len(task.customers), len(task), name)
        scorer.fit(task, dm)
        ranked = rank_customers(scorer, task, max(cuts.values()), seed=int(t.seed))
        frames[name] = per_item_frame(task, audience_metrics(ranked, task.buyers, n_ranked, cuts))
    meta = {
        "split": cfg.split,
        "data": {"name": dm.manifest["name"], "config_hash": dm.manifest["config_hash"]},
        "customers": len(task.customers),
        "items": len(task),
        "cold_items": int(task.is_cold.sum()),
        "buyers": int(sum(len(b) for b in task.buyers)),
        "min_buyers": int(t.min_buyers),
        "exclude_buyers": bool(t.exclude_buyers),
        "cutoffs": cuts,
        **meta,
    }
    return frames, meta


def _fit_blend(cfg, dm, scorers: dict[str, AudienceScorer]) -> tuple[BlendAudience, dict]:
    """The model blended with ``task.blend.members``, weighted as chosen on the validation window."""
    t = cfg.task
    members = list(t.blend.members)
    unknown = [m for m in members if m not in scorers or m == "two_tower"]
    if unknown:
        raise ValueError(f"task.blend.members {unknown} are not baselines of task.baselines ({list(scorers)[1:]})")
    if cfg.split != "test":
        raise ValueError("task.blend chooses its weights on the validation window: use it with split=test")
    val = audience_task(dm, "val", int(t.min_buyers), bool(t.exclude_buyers))
    if len(val) == 0:
        raise ValueError(f"task.blend: no item was bought by {t.min_buyers}+ customers in the val window")
    chosen = {"two_tower": scorers["two_tower"], **{m: scorers[m] for m in members}}
    weights, grid = choose_blend(chosen, val, dm, float(t.blend.step), str(t.blend.cut), int(t.seed))
    log.info("audience blend: weights %s chosen on %d validation items", weights, len(val))
    info = {"weights": weights, "chosen_on": f"val, {len(val)} items, recall@{t.blend.cut}",
            "val_grid": grid.to_dict("records")}
    return BlendAudience(chosen, weights), info


def write_audience(out, frames: dict[str, pd.DataFrame], meta: dict, t, title: str) -> dict:
    """Write the results record (``metrics.json``, kind ``audience``: each scorer's slices, and in its
    ``header`` the task, the paired tests and the blend), ``audience.md``, ``audience_paired.csv`` and
    each scorer's ``<name>/audience_per_item.parquet`` into ``out``; print the table.

    Returns:
        ``{scorer: {slice: {"items": n, metric@K: mean}}}``.
    """
    from pathlib import Path

    from towerrec.evaluation.results import ModelResult, Results, role_of

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: summarize(frame) for name, frame in frames.items()}
    for name, frame in frames.items():
        (out / name).mkdir(exist_ok=True)
        frame.to_parquet(out / name / "audience_per_item.parquet", index=False)
    reference = "two_tower" if "two_tower" in frames else next(iter(frames))
    shown = [f"{m}@{label}" for label in t.print_cuts for m in ("precision", "recall")]
    paired = paired_tests(frames, reference, shown, seed=int(t.seed)) if len(frames) > 1 else pd.DataFrame()
    paired.to_csv(out / "audience_paired.csv", index=False)
    header = {k: v for k, v in meta.items() if k not in ("split", "data")}
    record = Results(
        "audience",
        meta["split"],
        meta["data"],
        {name: ModelResult(role_of(name), values) for name, values in results.items()},
        header={**header, "paired": paired.to_dict("records")},
    )
    record.write(out / "metrics.json")
    table = format_audience_table(results, shown)
    p_cols = ["a", "b", "slice", "metric", "items", "mean_diff", "lo", "hi", "p_value", "verdict"]
    p_table = (
        markdown_table(paired.rename(columns={"users": "items"})[p_cols]) if len(paired) else "(one scorer)"
    )
    blend = f"\nblend weights (chosen on {meta['blend']['chosen_on']}): {meta['blend']['weights']}\n" if "blend" in meta else ""
    (out / "audience.md").write_text(
        f"# {title}\n\nK: {meta['cutoffs']}\n{blend}\n{table}\n\n## Paired over items\n\n{p_table}\n"
    )
    print(
        f"{title}\nK: {meta['cutoffs']}{blend}\n{table}\n\npaired over items ({reference} - other):\n{p_table}\n"
        f"metrics: {out / 'metrics.json'}"
    )
    return results


def evaluate_audience(cfg) -> dict[str, dict[str, dict[str, float]]]:
    """``towerrec-eval task=audience`` on one split (a temporal config, or one fold of a rolling one):
    the model (``ckpt_path``), the baselines of ``cfg.task`` and their blend, written into ``cfg.out_dir``
    by :func:`write_audience`. A whole rolling backtest goes through
    :func:`towerrec.backtest.audience_folds`.

    Returns:
        ``{scorer: {slice: {"items": n, metric@K: mean}}}``.
    """
    frames, meta = audience_frames(cfg)
    t = cfg.task
    title = (
        f"{meta['data']['name']}, {cfg.split} window: {meta['items']} items ({meta['cold_items']} cold) bought by "
        f"{t.min_buyers}+ customers, {meta['customers']} customers ranked per item"
    )
    return write_audience(cfg.out_dir, frames, meta, t, title)
