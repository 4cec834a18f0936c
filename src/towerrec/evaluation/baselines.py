"""Non-learned baselines, scored in the same harness as the two-tower model.

Every baseline is fitted on a :class:`~towerrec.data.datamodule.SequenceDataModule` and then scores
the users of an :class:`~towerrec.data.datamodule.EvalSplit` over the whole catalogue::

    baseline.fit(dm)
    topk = rank(baseline, dm.test_split, k=50)       # metrics.topk_from_scorer, seen items masked
    evaluate_split(topk, dm.test_split, ...)          # the same table as the model's

``score(split, rows)`` returns a fresh ``(b, N+1)`` float matrix for the split's users ``rows``;
higher is better, column 0 is padding. Fitting reads only training interactions (``split ==
"train"``). Scoring may also read what came before the split's cut: the split's own history (for the
test split that includes the validation interactions, which precede the test cut) and, for
:class:`RecentPopularity` and :class:`Repurchase`, the interactions table up to that cut.

Several baselines rank some candidates by evidence (own purchases, co-occurrence) and the rest by
popularity. They do so with scores in disjoint ranges, so the fill never outranks the evidence and
ties within each range fall to ``topk_items``' rule (lower item index first).
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from towerrec.data.datamodule import EvalSplit, SequenceDataModule
from towerrec.data.features import content_features, sparse
from towerrec.data.splits import EVAL_SPLITS, history_splits
from towerrec.ranking import PAD, seen_pairs, topk_from_scorer

Count = Literal["events", "units"]


# ----------------------------------------------------------------------------- helpers
def rank(baseline: Baseline, split: EvalSplit, k: int, chunk_size: int = 1024, chunk_users: int = 65536) -> Tensor:
    """Top-k items for every user of ``split`` (seen items masked when the split has them), with the
    seen items cut from the memory maps ``chunk_users`` users at a time."""
    step = max(chunk_size, chunk_users // chunk_size * chunk_size)
    parts = [
        topk_from_scorer(
            lambda rows, lo=lo: baseline.score(split, rows + lo),
            n_users=min(step, len(split) - lo),
            k=k,
            seen=None if split.seen is None else seen_pairs(split.seen[lo : lo + step]),
            chunk_size=chunk_size,
        )
        for lo in range(0, len(split), step)
    ]
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.long)


def history_before_cut(dm: SequenceDataModule, split_name: str) -> pd.DataFrame:
    """The interactions before ``split_name``'s cut, sorted by user then time (stable)."""
    inter = dm.interactions
    return inter[inter["split"].isin(history_splits(split_name)).to_numpy()]


def item_counts(table: pd.DataFrame, n_items: int, units: bool = False) -> Tensor:
    """``(N+1,)`` interactions per item in ``table``; with ``units``, summed ``quantity`` where there is one."""
    weights = table["quantity"].to_numpy(dtype=np.float64) if units and "quantity" in table else None
    counts = np.bincount(table["item_idx"].to_numpy(), weights=weights, minlength=n_items + 1)
    return torch.from_numpy(counts).float()


def recent_counts(dm: SequenceDataModule, split_name: str, days: int, units: bool = False) -> Tensor:
    """``(N+1,)`` interaction counts over the ``days`` days before ``split_name``'s cut.

    Temporal splits: the window ``[cut - days, cut)`` of the history before the cut (for the test
    split that is train + validation, before ``test_start``). Leave-one-out splits have no global cut,
    so the window is the last ``days`` days of the training data for both splits.
    """
    split_info = dm.manifest["split"]
    hist = history_before_cut(dm, split_name)
    if split_info["method"] == "temporal":
        end = pd.Timestamp(split_info[f"{split_name}_start"])
        hist = hist[(hist["timestamp"] < end).to_numpy()]
    else:
        hist = hist[(hist["split"] == "train").to_numpy()]
        end = hist["timestamp"].max() + pd.Timedelta(microseconds=1)
    window = hist[(hist["timestamp"] >= end - pd.Timedelta(days=days)).to_numpy()]
    return item_counts(window, dm.item_features.num_items, units)


def _units(count: str) -> bool:
    if count not in ("events", "units"):
        raise ValueError(f"count must be 'events' or 'units', got {count!r}")
    return count == "units"


def below_one(values: Tensor) -> Tensor:
    """Map non-negative values to ``[0, 1)``, keeping their order: a fill that ranks below any score >= 1."""
    return values.float() / (values.max().clamp(min=0) + 1.0)


def history_weights(history: Tensor, n_items: int, recent: int | None = None, binary: bool = False) -> Tensor:
    """``(b, N+1)`` dense weights of each user's history items (left-padded ``(b, L)``), PAD dropped.

    Args:
        recent: keep only the last ``recent`` positions.
        binary: 1 per distinct item instead of the number of occurrences.
    """
    if recent is not None:
        history = history[:, -recent:]
    w = torch.zeros(history.shape[0], n_items + 1)
    w.scatter_add_(1, history, torch.ones_like(history, dtype=torch.float))
    w[:, PAD] = 0.0
    return (w > 0).float() if binary else w


def times(weights: Tensor, matrix_t: Tensor) -> Tensor:
    """``weights @ matrix`` as a fresh dense tensor, for a dense or sparse ``matrix`` given as its transpose."""
    if matrix_t.layout == torch.strided:
        return weights @ matrix_t.T
    return torch.sparse.mm(matrix_t, weights.T.contiguous()).T.contiguous()


# ----------------------------------------------------------------------------- baselines
class Baseline:
    """A scorer: ``fit(dm)`` on training data, then ``score(split, rows) -> (b, N+1)``."""

    name = "baseline"

    def fit(self, dm: SequenceDataModule) -> Baseline:
        raise NotImplementedError

    def score(self, split: EvalSplit, rows: Tensor) -> Tensor:
        raise NotImplementedError


class Random(Baseline):
    """Uniform random scores, a sanity floor. Each user's scores depend only on the seed and user id."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.name = "random"
        self.n_items = 0

    def fit(self, dm: SequenceDataModule) -> Random:
        self.n_items = dm.item_features.num_items
        return self

    def score(self, split: EvalSplit, rows: Tensor) -> Tensor:
        out = torch.empty(len(rows), self.n_items + 1)
        gen = torch.Generator()
        for i, user in enumerate(split.user_idx[rows.cpu()].tolist()):
            gen.manual_seed(self.seed * 1_000_003 + user)
            out[i] = torch.rand(self.n_items + 1, generator=gen)
        return out


class Popularity(Baseline):
    """The same list for everyone: items by number of training interactions.

    Args:
        count: ``"events"`` counts rows of the processed table (on H&M, one per customer, article and
            day); ``"units"`` sums their ``quantity`` (one per row of H&M's ``transactions.csv``).
    """

    def __init__(self, count: Count = "events") -> None:
        self.units = _units(count)
        self.name = "popularity" + ("_units" if self.units else "")

    def fit(self, dm: SequenceDataModule) -> Popularity:
        train = dm.interactions[(dm.interactions["split"] == "train").to_numpy()]
        self.counts = item_counts(train, dm.item_features.num_items, self.units)  # (N+1,)
        return self

    def score(self, split: EvalSplit, rows: Tensor) -> Tensor:
        return self.counts.expand(len(rows), -1).clone()


class RecentPopularity(Baseline):
    """Items by interactions in the last ``days`` days before the split's cut (see :func:`recent_counts`).

    Args:
        count: ``"events"`` or ``"units"``, as for :class:`Popularity`.
    """

    def __init__(self, days: int = 7, count: Count = "events") -> None:
        if days < 1:
            raise ValueError(f"days must be positive, got {days}")
        self.days = days
        self.units = _units(count)
        self.name = f"recent_popularity_{days}d" + ("_units" if self.units else "")
        self.counts: dict[str, Tensor] = {}

    def fit(self, dm: SequenceDataModule) -> RecentPopularity:
        self.counts = {name: recent_counts(dm, name, self.days, self.units) for name in EVAL_SPLITS}
        return self

    def score(self, split: EvalSplit, rows: Tensor) -> Tensor:
        return self.counts[split.name].expand(len(rows), -1).clone()


class Repurchase(Baseline):
    """The user's own past items, most recent first, then :class:`RecentPopularity` to fill.

    The own items come from the whole history before the split's cut (all of it, not the
    ``max_history`` items of ``split.history``); for the test split that includes validation.
    An item's recency is the time of its latest purchase.

    Args:
        days: the window of the popularity fill.
        count: ``"events"`` or ``"units"`` for the fill, as for :class:`Popularity`.
        same_time: items last bought at the same timestamp (several H&M purchases share a date, and
            their order within the day is unknown): ``"tie"`` gives them equal scores, so the lower
            item index goes first, as for every tie; ``"row_order"`` puts the later row of the
            processed table (the later row of the source file) first.
    """

    def __init__(
        self, days: int = 7, count: Count = "events", same_time: Literal["tie", "row_order"] = "tie"
    ) -> None:
        if same_time not in ("tie", "row_order"):
            raise ValueError(f"same_time must be 'tie' or 'row_order', got {same_time!r}")
        self.days = days
        self.units = _units(count)
        self.same_time = same_time
        self.name = (
            "repurchase"
            + ("_units" if self.units else "")
            + ("_row_order" if same_time == "row_order" else "")
        )
        self.fill: dict[str, Tensor] = {}
        self.own: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def fit(self, dm: SequenceDataModule) -> Repurchase:
        for name in EVAL_SPLITS:
            split = dm.eval_split(name)
            self.fill[name] = below_one(recent_counts(dm, name, self.days, self.units))
            hist = history_before_cut(dm, name)
            row_of = pd.Series(np.arange(len(split)), index=split.user_idx.numpy())
            hist = hist[hist["user_idx"].isin(row_of.index).to_numpy()]
            # The latest purchase of each (user, item); the table is sorted by user, then time (stable).
            last = pd.DataFrame(
                {
                    "row": row_of.loc[hist["user_idx"].to_numpy()].to_numpy(),
                    "item": hist["item_idx"].to_numpy(),
                    "time": hist["timestamp"].to_numpy(),
                    "pos": np.arange(len(hist)),
                }
            ).drop_duplicates(["row", "item"], keep="last")
            # Rank 1 = least recent, so more recent items score higher.
            key, method = ("time", "dense") if self.same_time == "tie" else ("pos", "first")
            recency = last.groupby("row")[key].rank(method=method).to_numpy()
            self.own[name] = (
                torch.tensor(last["row"].to_numpy()),
                torch.tensor(last["item"].to_numpy()),
                torch.tensor(1.0 + recency, dtype=torch.float),
            )
        return self

    def score(self, split: EvalSplit, rows: Tensor) -> Tensor:
        if split.name not in self.own:
            raise ValueError(f"Repurchase was fitted for splits {list(self.own)}, not {split.name!r}")
        scores = self.fill[split.name].expand(len(rows), -1).clone()  # [0, 1)
        own_rows, own_items, own_scores = self.own[split.name]
        local = torch.full((len(split),), -1, dtype=torch.long)
        local[rows.cpu()] = torch.arange(len(rows))
        keep = local[own_rows] >= 0
        scores[local[own_rows[keep]], own_items[keep]] = own_scores[keep]  # >= 2
        return scores


class ItemKNN(Baseline):
    """Item-to-item cosine over training co-occurrence; candidates scored from the user's history.

    ``sim(i, j) = c(i, j) / (sqrt(n_i * n_j) + shrink)`` where ``c`` counts training users who had
    both items (or, with ``window``, pairs at most ``window`` positions apart in a user's sequence) and
    ``n`` is the item's user count (occurrences with ``window``). Each item keeps its ``neighbours``
    most similar items, so the matrix stays sparse on large catalogues. Candidates without any
    similarity are ranked below all others by training popularity.

    Args:
        mode: ``"last"`` scores by similarity to the last history item, ``"history"`` by the summed
            similarity to every distinct history item.
        shrink: damps similarities supported by few co-occurrences.
        window: count only pairs this close in the sequence; None counts every pair of the user.
        neighbours: similar items kept per item.
    """

    def __init__(
        self,
        mode: Literal["last", "history"] = "last",
        shrink: float = 10.0,
        window: int | None = None,
        neighbours: int = 200,
    ) -> None:
        if mode not in ("last", "history"):
            raise ValueError(f"mode must be 'last' or 'history', got {mode!r}")
        self.mode = mode
        self.shrink = shrink
        self.window = window
        self.neighbours = neighbours
        self.name = f"itemknn_{mode}" + (f"_window{window}" if window is not None else "")

    def fit(self, dm: SequenceDataModule) -> ItemKNN:
        inter = dm.interactions
        train = inter[(inter["split"] == "train").to_numpy()]
        n = dm.item_features.num_items + 1
        self.sim_t = self.similarity(train["user_idx"].to_numpy(), train["item_idx"].to_numpy(), n)
        self.fill = below_one(dm.item_features.train_count.float()) - 1.0  # [-1, 0)
        return self

    def similarity(self, user: np.ndarray, item: np.ndarray, n: int) -> Tensor:
        """The transposed ``(n, n)`` sparse similarity (row i of the untransposed: item i's neighbours).

        Args:
            user, item: interactions sorted by user, then time.
        """
        if self.window is None:
            pairs = pd.DataFrame({"u": user, "i": item}).drop_duplicates()
            x = sparse(
                torch.tensor(np.stack([pairs["u"].to_numpy(), pairs["i"].to_numpy()])),
                torch.ones(len(pairs)),
                (int(user.max(initial=0)) + 1, n),
            )
            with warnings.catch_warnings():  # sparse @ sparse goes through beta CSR kernels internally
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                co = torch.sparse.mm(x.t().coalesce(), x).coalesce()  # (n, n) users sharing both items
            norm = torch.bincount(torch.tensor(pairs["i"].to_numpy()), minlength=n).float()
        else:
            src, dst = [], []
            for d in range(1, self.window + 1):
                same = user[d:] == user[:-d]
                src.append(item[:-d][same])
                dst.append(item[d:][same])
            a, b = np.concatenate(src), np.concatenate(dst)
            idx = torch.tensor(np.stack([np.r_[a, b], np.r_[b, a]]))
            co = sparse(idx, torch.ones(idx.shape[1]), (n, n))
            norm = torch.bincount(torch.tensor(item), minlength=n).float()
        i, j = co.indices()
        keep = i != j
        i, j, c = i[keep], j[keep], co.values()[keep]
        s = c / (torch.sqrt(norm[i] * norm[j]) + self.shrink)
        # Top neighbours per row: order by (row, similarity descending), then rank within the row.
        order = torch.from_numpy(np.lexsort((-s.numpy(), i.numpy())))
        i, j, s = i[order], j[order], s[order]
        start = torch.searchsorted(i, i, right=False)
        keep = torch.arange(len(i)) - start < self.neighbours
        return sparse(torch.stack([j[keep], i[keep]]), s[keep], (n, n))

    def score(self, split: EvalSplit, rows: Tensor) -> Tensor:
        history = split.history[rows.cpu()]  # (b, L), most recent last
        n = self.sim_t.shape[0] - 1
        if self.mode == "last":
            w = history_weights(history, n, recent=1)
        else:
            w = history_weights(history, n, binary=True)
        sim = times(w, self.sim_t)  # (b, N+1)
        return torch.where(sim > 0, sim, self.fill.expand_as(sim))


class ContentKNN(Baseline):
    """Cold-start floor without training: cosine between candidates and the user's recent history items.

    The user vector is the mean of the feature vectors of the last ``recent`` history items; every
    item, cold or warm, is scored by its cosine with it. ``"both"`` averages the image and content
    cosines. Users without history score every item 0.

    Args:
        features: ``"image"`` (8x8 thumbnail + colour histogram of the cached images), ``"content"``
            (TF-IDF over categories and hashed text tokens) or ``"both"``.
        recent: history items averaged into the user vector.
    """

    def __init__(self, features: Literal["image", "content", "both"] = "both", recent: int = 5) -> None:
        if features not in ("image", "content", "both"):
            raise ValueError(f"features must be 'image', 'content' or 'both', got {features!r}")
        self.features = features
        self.recent = recent
        self.name = f"content_knn_{features}"
        self.item_t: list[Tensor] = []
        self.item: list[Tensor] = []

    def fit(self, dm: SequenceDataModule) -> ContentKNN:
        f = dm.item_features
        mats = []
        if self.features in ("image", "both"):
            img = f.looks  # dense (N+1, 256) image features
            mats.append((img, img.T.contiguous()))
        if self.features in ("content", "both"):
            txt = content_features(f)  # sparse (N+1, D)
            mats.append((txt, txt.t().coalesce()))
        self.item = [m for m, _ in mats]  # (N+1, D)
        self.item_t = [m_t for _, m_t in mats]  # (D, N+1)
        return self

    def score(self, split: EvalSplit, rows: Tensor) -> Tensor:
        history = split.history[rows.cpu()]
        n = self.item[0].shape[0] - 1
        w = history_weights(history, n, recent=self.recent)
        w = w / w.sum(dim=1, keepdim=True).clamp(min=1.0)  # mean over the recent items
        scores = torch.zeros(len(rows), n + 1)
        for item, item_t in zip(self.item, self.item_t, strict=True):
            user = F.normalize(times(w, item_t), dim=-1)  # (b, D)
            scores += times(user, item) / len(self.item)  # (b, N+1)
        return scores
