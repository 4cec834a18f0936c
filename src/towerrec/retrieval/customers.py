"""Audiences for a campaign: from items to the customers most likely to buy them, through the same towers.

An export written with ``towerrec-export ... users=true`` also holds its customers (the manifest says
``"customer_data": true``): every customer's user-tower embedding from their history up to the data's
cut-off, a FAISS index of the same factory and metric over them, their prepared segments and the items
each already bought. :func:`load_audiences` reads them back (verified against the manifest like the
item files) and :class:`Audiences` answers "which customers should we contact about these items?":

- a campaign of several items scores each customer by the best (``max``) or ``mean`` match;
- opt-outs are never returned, whatever the score; past buyers of the campaign's items are left out
  by default; ``segments`` keeps only customers in the given prepared segments;
- :meth:`Audiences.batch` assigns a batch of campaigns with at most ``max_per_customer`` audiences
  per customer, each customer going where they score highest.

Neither torch nor the model code is imported here: the customers were embedded at export time.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from towerrec.fileio import file_sha256, load_npy
from towerrec.retrieval.folder import ExportError
from towerrec.retrieval.index import METRIC, search, set_params
from towerrec.retrieval.load import ItemIndex, load_export

log = logging.getLogger(__name__)

CUSTOMER_INDEX_FILE = "customer_index.faiss"
CUSTOMERS_FILE = "customer_ids.parquet"
CUSTOMER_EMBEDDINGS_FILE = "customer_embeddings.npy"
PURCHASES_FILE = "customer_purchases.parquet"
#: The customer files of an export written with ``users=true``, listed in ``manifest["customers"]["files"]``.
CUSTOMER_FILES = (CUSTOMER_INDEX_FILE, CUSTOMERS_FILE, CUSTOMER_EMBEDDINGS_FILE, PURCHASES_FILE)
#: Segment columns of the customer table that ``segments`` may filter on.
SEGMENT_COLUMNS = ("lifecycle", "rfm_segment", "rfm_r", "rfm_f", "rfm_m")
AGGREGATES = ("max", "mean")
#: Columns of an audience table (one row per customer per campaign).
AUDIENCE_COLUMNS = ["campaign", "rank", "customer_id", "score", "segment", "rfm_segment"]


class AudienceError(ValueError):
    """A campaign or option that cannot be answered (unknown item, empty campaign, k too large, ...)."""


# ---------------------------------------------------------------------------- campaigns
@dataclass
class Campaign:
    """One campaign: its items and how many customers to contact.

    Args:
        items: raw item ids (several items: each customer is scored by the best or mean match).
        k: customers to return.
        name: the campaign's name in the output (the joined item ids when empty).
    """

    items: list[str]
    k: int
    name: str = ""

    def __post_init__(self) -> None:
        self.items = [str(i) for i in self.items]
        if not self.items:
            raise AudienceError("empty campaign: give at least one item id")
        if not isinstance(self.k, int) or self.k < 1:
            raise AudienceError(f"k must be a positive integer, got {self.k!r}")
        self.name = self.name or "+".join(self.items)


@dataclass
class Filters:
    """Who may be in an audience.

    Args:
        exclude: customer ids never returned (the opt-out list).
        exclude_buyers: leave out customers who already bought one of the campaign's items.
        segments: ``{column: allowed values}``; a customer must match every column (values of one
            column are alternatives). Columns: :data:`SEGMENT_COLUMNS`.
    """

    exclude: set[str] = field(default_factory=set)
    exclude_buyers: bool = True
    segments: dict[str, set[str]] = field(default_factory=dict)


def parse_segments(specs: list[str] | tuple[str, ...]) -> dict[str, set[str]]:
    """``["lifecycle=active", "rfm_r=3", "R3F3M3"]`` -> ``{column: values}``; a bare value is a
    lifecycle stage or an RFM segment (``R3F3M3``)."""
    out: dict[str, set[str]] = {}
    for spec in specs:
        column, sep, value = str(spec).partition("=")
        if not sep:
            column, value = ("rfm_segment" if value_is_rfm(column) else "lifecycle"), column
        column, value = column.strip(), value.strip()
        if column not in SEGMENT_COLUMNS:
            raise AudienceError(
                f"segment {spec!r}: unknown column {column!r} (one of {', '.join(SEGMENT_COLUMNS)})"
            )
        if not value:
            raise AudienceError(f"segment {spec!r}: no value after '='")
        out.setdefault(column, set()).add(value)
    return out


def value_is_rfm(value: str) -> bool:
    return len(value) == 6 and value[0] == "R" and value[2] == "F" and value[4] == "M"


def read_opt_outs(path: str | Path) -> set[str]:
    """Customer ids of an opt-out file: a ``.parquet`` or ``.csv`` with a ``customer_id`` column, or a
    text file with one id per line (blank lines and ``#`` comments skipped).

    Raises:
        AudienceError: one line naming the file (and row) for a missing or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudienceError(f"opt-out file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001  (pyarrow raises several kinds)
            raise AudienceError(
                f"opt-out file {path}: not a readable parquet file ({type(err).__name__})"
            ) from None
        if "customer_id" not in table:
            raise AudienceError(
                f"opt-out file {path}: no customer_id column (columns: {', '.join(map(str, table.columns))})"
            )
        ids = table["customer_id"]
        if ids.isna().any():
            raise AudienceError(
                f"opt-out file {path}: row {int(np.flatnonzero(ids.isna().to_numpy())[0]) + 1}: empty customer_id"
            )
        return set(ids.astype(str))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AudienceError(f"opt-out file {path}: not UTF-8 text (byte {err.start})") from None
    if suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows or "customer_id" not in [c.strip() for c in rows[0]]:
            raise AudienceError(f"opt-out file {path}: row 1: expected a header with a customer_id column")
        header = [c.strip() for c in rows[0]]
        col = header.index("customer_id")
        out = set()
        for n, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != len(header) or not row[col].strip():
                raise AudienceError(
                    f"opt-out file {path}: row {n}: expected {len(header)} fields with a customer_id, got {row!r:.80}"
                )
            out.add(row[col].strip())
        return out
    out = set()
    for n, line in enumerate(text.splitlines(), start=1):
        value = line.split("#", 1)[0].strip()
        if not value:
            continue
        if any(c in value for c in ",;\t ") or len(value) > 256:
            raise AudienceError(
                f"opt-out file {path}: row {n}: expected one customer id per line, got {value[:80]!r}"
            )
        out.add(value)
    return out


# ---------------------------------------------------------------------------- the loaded customers
class Audiences:
    """The customers of an export (``users=true``) over its :class:`ItemIndex`.

    Use :func:`load_audiences` to make one.
    """

    def __init__(
        self,
        items: ItemIndex,
        index: faiss.Index,
        customers: pd.DataFrame,
        embeddings: np.ndarray,
        purchases: pd.DataFrame,
    ) -> None:
        self.items = items
        self.index = index  # ids = user_idx
        self.customers = customers.reset_index(drop=True)
        self.embeddings = embeddings  # (C, D), row r = customers.iloc[r]
        self._user_idx = self.customers["user_idx"].to_numpy()
        self._row_of_idx = np.full(int(self._user_idx.max(initial=0)) + 1, -1, dtype=np.int64)
        self._row_of_idx[self._user_idx] = np.arange(len(self.customers))
        self._row_of_id = pd.Series(
            np.arange(len(self.customers)), index=self.customers["customer_id"].to_numpy()
        )
        # item_idx -> customer rows who bought it
        p_rows = self._row_of_idx[purchases["user_idx"].to_numpy()]
        p_items = purchases["item_idx"].to_numpy()
        order = np.argsort(p_items, kind="stable")
        self._buyer_rows, self._buyer_items = p_rows[order], p_items[order]

    def __len__(self) -> int:
        return len(self.customers)

    def __repr__(self) -> str:
        return f"Audiences({str(self.items.root)!r}, {len(self)} customers)"

    # ------------------------------------------------------------------ eligibility
    def buyers(self, item_idx: np.ndarray) -> np.ndarray:
        """Customer rows who bought any of ``item_idx`` up to the data's cut-off."""
        lo = np.searchsorted(self._buyer_items, item_idx, side="left")
        hi = np.searchsorted(self._buyer_items, item_idx, side="right")
        if not len(item_idx):
            return np.empty(0, dtype=np.int64)
        return np.unique(np.concatenate([self._buyer_rows[a:b] for a, b in zip(lo, hi, strict=True)]))

    def eligible(self, item_idx: np.ndarray, filters: Filters) -> np.ndarray:
        """``(C,)`` bool: customers who may be in this campaign's audience."""
        ok = np.ones(len(self), dtype=bool)
        if filters.exclude:
            known = self._row_of_id.reindex(list(filters.exclude)).dropna().to_numpy(dtype=np.int64)
            ok[known] = False
        if filters.exclude_buyers:
            ok[self.buyers(item_idx)] = False
        for column, values in filters.segments.items():
            if column not in self.customers:
                raise AudienceError(f"segment column {column!r} is not in this export's customer table")
            ok &= self.customers[column].astype(str).isin(values).to_numpy()
        return ok

    # ------------------------------------------------------------------ scoring
    def _campaign_vectors(self, campaign: Campaign) -> tuple[np.ndarray, np.ndarray]:
        """The campaign items' ``(E, D)`` embeddings and item indices."""
        try:
            rows = self.items.rows(campaign.items)
        except KeyError as err:  # UnknownItemError
            raise AudienceError(str(err)) from None
        return self.items.embeddings[rows], self.items.items["item_idx"].to_numpy()[rows]

    def candidates(
        self, campaign: Campaign, filters: Filters, aggregate: str, want: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Eligible customers ``(rows, scores)``, best first, at least ``want`` of them when there are.

        The index is searched per item (``max``) or with the mean item vector (``mean``, whose inner
        product is the mean of the inner products), fetching more until ``want`` eligible customers
        are found; candidates are then scored exactly from the embeddings.
        """
        if aggregate not in AGGREGATES:
            raise AudienceError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        vectors, item_idx = self._campaign_vectors(campaign)
        ok = self.eligible(item_idx, filters)
        n_ok = int(ok.sum())
        want = min(want, n_ok)
        queries = vectors if aggregate == "max" else vectors.mean(axis=0, keepdims=True)
        fetch = min(len(self), max(2 * want, want + (len(self) - n_ok)) if want else 0)
        while want:
            _, found = search(self.index, queries, fetch)  # (Q, fetch) user_idx, -1 past the end
            rows = [self._row_of_idx[f[f >= 0]] for f in found]
            rows = [r[ok[r]] for r in rows]
            if min(len(r) for r in rows) >= want or fetch >= len(self):
                break
            fetch = min(len(self), 2 * fetch)
        if not want:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        cand = np.unique(np.concatenate(rows))
        if len(cand) < want:  # the ANN index missed some; fall back on exact scoring of all eligible
            cand = np.flatnonzero(ok)
        sims = self.embeddings[cand] @ vectors.T  # (n, E)
        scores = sims.max(axis=1) if aggregate == "max" else sims.mean(axis=1)
        order = np.lexsort((self._user_idx[cand], -scores))  # best first, ties by customer index
        return cand[order], scores[order].astype(np.float32)

    def audience(
        self, campaign: Campaign, filters: Filters | None = None, aggregate: str = "max"
    ) -> pd.DataFrame:
        """The ``campaign.k`` customers most likely to buy the campaign's items, best first.

        Returns:
            :data:`AUDIENCE_COLUMNS`; fewer than ``k`` rows when fewer customers are eligible.

        Raises:
            AudienceError: unknown item ids, an empty campaign, ``k`` beyond the customer count.
        """
        return self.batch([campaign], filters, aggregate)

    def batch(
        self,
        campaigns: list[Campaign],
        filters: Filters | None = None,
        aggregate: str = "max",
        max_per_customer: int | None = None,
    ) -> pd.DataFrame:
        """Audiences of several campaigns; with ``max_per_customer``, each customer is in at most that
        many of them, assigned greedily where they score highest (the best remaining (campaign,
        customer) pair first, while the campaign still has room).

        Returns:
            :data:`AUDIENCE_COLUMNS`, campaigns in the given order.
        """
        filters = filters or Filters()
        if not campaigns:
            raise AudienceError("no campaign given")
        for c in campaigns:
            if c.k > len(self):
                raise AudienceError(f"k={c.k} is beyond the {len(self)} customers of this export")
        if max_per_customer is not None and max_per_customer < 1:
            raise AudienceError(f"max_per_customer must be at least 1, got {max_per_customer}")
        names = [c.name for c in campaigns]
        if len(set(names)) != len(names):
            raise AudienceError("two campaigns have the same name (give each its own items or name)")
        capped = max_per_customer is not None and max_per_customer < len(campaigns)
        want = [c.k for c in campaigns]
        while True:
            cands = [self.candidates(c, filters, aggregate, w) for c, w in zip(campaigns, want, strict=True)]
            chosen = self._assign(campaigns, cands, max_per_customer if capped else None)
            short = [
                j for j, (c, rows) in enumerate(zip(campaigns, chosen, strict=True))
                if len(rows) < c.k and len(cands[j][0]) >= want[j] and want[j] < len(self)
            ]  # fmt: skip
            if not short:
                break
            for j in short:  # a full campaign took some of these customers: look further down the list
                want[j] = min(len(self), 2 * want[j])
        frames = []
        for c, (rows, scores) in zip(campaigns, chosen, strict=True):
            cust = self.customers.iloc[rows]
            frames.append(
                pd.DataFrame(
                    {
                        "campaign": c.name,
                        "rank": np.arange(1, len(rows) + 1),
                        "customer_id": cust["customer_id"].astype(str).to_numpy(),
                        "score": np.asarray(scores, dtype=np.float32),
                        "segment": cust["lifecycle"].astype(str).to_numpy() if "lifecycle" in cust else "",
                        "rfm_segment": cust["rfm_segment"].astype(str).to_numpy()
                        if "rfm_segment" in cust
                        else "",
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)[AUDIENCE_COLUMNS]

    @staticmethod
    def _assign(
        campaigns: list[Campaign], cands: list[tuple[np.ndarray, np.ndarray]], cap: int | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        if cap is None:
            return [(rows[: c.k], scores[: c.k]) for c, (rows, scores) in zip(campaigns, cands, strict=True)]
        camp = np.concatenate([np.full(len(r), j) for j, (r, _) in enumerate(cands)])
        rows = np.concatenate([r for r, _ in cands])
        scores = np.concatenate([s for _, s in cands])
        order = np.lexsort((camp, rows, -scores))
        used: dict[int, int] = {}
        picked: list[list[tuple[int, float]]] = [[] for _ in campaigns]
        for t in order:
            j, r = int(camp[t]), int(rows[t])
            if len(picked[j]) < campaigns[j].k and used.get(r, 0) < cap:
                picked[j].append((r, float(scores[t])))
                used[r] = used.get(r, 0) + 1
        return [
            (np.array([r for r, _ in p], dtype=np.int64), np.array([s for _, s in p], dtype=np.float32))
            for p in picked
        ]


def load_audiences(path: str | Path | ItemIndex, verify: bool = True) -> Audiences:
    """The customers of an export folder written with ``towerrec-export ... users=true``.

    Args:
        path: the export folder, or its already loaded :class:`ItemIndex`.
        verify: check the customer files' sha256 against the manifest (sizes are checked always).

    Raises:
        ExportError: one line, for an export without customers or with changed customer files.
    """
    items = path if isinstance(path, ItemIndex) else load_export(path, verify=verify)
    root, manifest = items.root, items.manifest
    info = manifest.get("customers")
    if not manifest.get("customer_data") or not info:
        raise ExportError(f"{root}: this export holds no customers; re-run towerrec-export with users=true")
    for name in CUSTOMER_FILES:
        file, expected = root / name, info["files"].get(name)
        if expected is None or not file.is_file():
            raise ExportError(
                f"{root}: customer file {name} is missing; re-run towerrec-export with users=true"
            )
        if file.stat().st_size != expected["bytes"]:
            raise ExportError(
                f"{root}: {name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
            )
        if verify and file_sha256(file) != expected["sha256"]:
            raise ExportError(
                f"{root}: {name} sha256 does not match the manifest (file changed after export)"
            )
    index = faiss.read_index(str(root / CUSTOMER_INDEX_FILE))
    customers = pd.read_parquet(root / CUSTOMERS_FILE)
    embeddings = load_npy(root / CUSTOMER_EMBEDDINGS_FILE)
    purchases = pd.read_parquet(root / PURCHASES_FILE)
    count, dim = int(info["count"]), int(manifest["dim"])
    checks = [
        (
            index.ntotal == count,
            f"{CUSTOMER_INDEX_FILE} holds {index.ntotal} vectors, the manifest says {count}",
        ),
        (
            index.d == dim and index.metric_type == METRIC,
            f"{CUSTOMER_INDEX_FILE} is not a {dim}-d inner-product index",
        ),
        (len(customers) == count, f"{CUSTOMERS_FILE} has {len(customers)} rows, the manifest says {count}"),
        (
            embeddings.shape == (count, dim),
            f"{CUSTOMER_EMBEDDINGS_FILE} shape {embeddings.shape} != ({count}, {dim})",
        ),
        (customers["customer_id"].is_unique, f"{CUSTOMERS_FILE} has repeated customer ids"),
    ]
    for ok, what in checks:
        if not ok:
            raise ExportError(f"{root}: {what}; re-run towerrec-export with users=true")
    set_params(index, info.get("search_params") or {})
    return Audiences(items, index, customers, embeddings, purchases)
