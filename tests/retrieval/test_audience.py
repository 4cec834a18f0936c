"""Customer exports (``users=true``) and audience queries on small real exports of the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from towerrec.retrieval import ExportError, load_export
from towerrec.retrieval.customers import (
    CUSTOMER_FILES,
    AudienceError,
    Campaign,
    Filters,
    load_audiences,
    parse_segments,
    read_opt_outs,
)
from towerrec.retrieval.folder import MANIFEST_FILE
from towerrec.retrieval.recommend import Recommender
from towerrec.retrieval.writer import customer_histories, export_index

from .conftest import index_spec


@pytest.fixture(scope="module")
def customer_exports(tiny_ckpt, tmp_path_factory) -> dict:
    """``flat`` and ``hnsw`` exports with customers, and ``plain``: a flat export without them."""
    root = tmp_path_factory.mktemp("customer_exports")
    out = {
        name: export_index(tiny_ckpt, index_spec(name), root / name, n_queries=150, users=True)
        for name in ("flat", "hnsw")
    }
    out["plain"] = export_index(tiny_ckpt, index_spec("flat"), root / "plain", n_queries=50)
    return out


@pytest.fixture(scope="module")
def aud(customer_exports):
    return load_audiences(customer_exports["flat"])


def exact_audience(aud, items: list[str], ok: np.ndarray, k: int, aggregate: str = "max") -> list[str]:
    """Brute force: every eligible customer scored from the embeddings, best first."""
    vecs = aud.items.embeddings[aud.items.rows(items)]
    sims = aud.embeddings @ vecs.T
    score = sims.max(axis=1) if aggregate == "max" else sims.mean(axis=1)
    rows = np.flatnonzero(ok)
    rows = rows[np.lexsort((aud.customers["user_idx"].to_numpy()[rows], -score[rows]))][:k]
    return aud.customers["customer_id"].iloc[rows].tolist()


def bought(aud, items: list[str]) -> set[str]:
    root = aud.items.root
    p = pd.read_parquet(root / "customer_purchases.parquet")
    idx = set(aud.items.item_idx(items).tolist())
    users = set(p.loc[p["item_idx"].isin(idx), "user_idx"])
    return set(aud.customers.loc[aud.customers["user_idx"].isin(users), "customer_id"])


# ---------------------------------------------------------------------------- the export
def test_customer_index_recall_against_exact_search(customer_exports):
    manifest = json.loads((customer_exports["hnsw"] / MANIFEST_FILE).read_text())
    assert manifest["customer_data"] is True
    info = manifest["customers"]
    assert info["factory"] == manifest["factory"] and info["metric"] == manifest["metric"]
    assert set(info["files"]) == set(CUSTOMER_FILES)
    assert info["recall"]["recall_item"] >= 0.9
    # Recomputed here: every item as a query against exact inner-product search over the customers.
    aud = load_audiences(customer_exports["hnsw"])
    k = 10
    _, found = aud.index.search(np.ascontiguousarray(aud.items.embeddings), k)
    exact = np.argsort(-(aud.items.embeddings @ aud.embeddings.T), axis=1, kind="stable")[:, :k]
    exact_ids = aud.customers["user_idx"].to_numpy()[exact]
    recall = np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact_ids, strict=True)])
    assert recall >= 0.9
    assert info["count"] == len(aud) > 100


def test_customer_embeddings_are_the_user_tower_of_the_whole_history(customer_exports):
    """A customer's exported vector is the user tower over their purchases up to the cut-off
    (the same function validation ranks with), as the history query computes it."""
    index = load_export(customer_exports["flat"])
    aud = load_audiences(index)
    rec = Recommender(index)
    purchases = pd.read_parquet(index.manifest["data"]["processed_dir"] + "/interactions.parquet")
    for row in (0, len(aud) // 2, len(aud) - 1):
        user_idx = int(aud.customers["user_idx"].iloc[row])
        hist_idx = purchases.loc[purchases["user_idx"] == user_idx, "item_idx"].to_numpy()
        hist_ids = index.items.set_index("item_idx").loc[hist_idx, "item_id"].tolist()
        np.testing.assert_allclose(aud.embeddings[row], rec.user_vector(hist_ids), atol=1e-5)
    assert aud.customers["n_purchases"].sum() == len(purchases)


def test_customer_histories_keep_the_last_purchases():
    inter = pd.DataFrame({"user_idx": [1, 1, 1, 2, 3, 3], "item_idx": [5, 6, 7, 8, 9, 4]})
    got = customer_histories(inter, np.array([1, 3, 2]), 2)
    np.testing.assert_array_equal(got, [[6, 7], [9, 4], [0, 8]])


def test_nothing_about_customers_without_the_flag(customer_exports):
    plain = customer_exports["plain"]
    manifest = json.loads((plain / MANIFEST_FILE).read_text())
    assert manifest["customer_data"] is False and "customers" not in manifest
    assert not any((plain / name).exists() for name in CUSTOMER_FILES)
    assert not [p.name for p in plain.iterdir() if "customer" in p.name or "user" in p.name]
    with pytest.raises(ExportError, match="users=true"):
        load_audiences(plain)


def test_changed_customer_file_is_refused(customer_exports, tmp_path):
    import shutil

    copy = shutil.copytree(customer_exports["flat"], tmp_path / "copy")
    emb = np.load(copy / "customer_embeddings.npy")
    emb[0, 0] += 0.5
    np.save(copy / "customer_embeddings.npy", emb)
    with pytest.raises(ExportError, match="customer_embeddings.npy sha256"):
        load_audiences(copy)


# ---------------------------------------------------------------------------- the query
def test_audience_is_the_exact_ranking_of_eligible_customers(aud):
    item = aud.items.items["item_id"].iloc[3]
    table = aud.audience(Campaign([item], 15))
    ok = aud.eligible(aud.items.item_idx([item]), Filters())
    assert table["customer_id"].tolist() == exact_audience(aud, [item], ok, 15)
    assert table["rank"].tolist() == list(range(1, 16))
    assert (np.diff(table["score"].to_numpy()) <= 1e-6).all()
    assert list(table.columns) == ["campaign", "rank", "customer_id", "score", "segment", "rfm_segment"]


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_several_items_best_or_mean_match(aud, aggregate):
    items = aud.items.items["item_id"].iloc[[1, 40, 90]].tolist()
    table = aud.audience(Campaign(items, 20), aggregate=aggregate)
    ok = aud.eligible(aud.items.item_idx(items), Filters())
    assert table["customer_id"].tolist() == exact_audience(aud, items, ok, 20, aggregate)
    other = "mean" if aggregate == "max" else "max"
    assert table["customer_id"].tolist() != exact_audience(aud, items, ok, 20, other)


def test_opt_outs_are_never_returned(aud):
    item = aud.items.items["item_id"].iloc[7]
    top = aud.audience(Campaign([item], 10))["customer_id"].tolist()
    opt_out = set(top[:5]) | {"not-a-customer"}
    everyone = aud.audience(Campaign([item], len(aud)), Filters(exclude=opt_out, exclude_buyers=False))
    assert not opt_out & set(everyone["customer_id"])
    assert len(everyone) == len(aud) - 5


def test_past_buyers_left_out_by_default(aud):
    counts = pd.read_parquet(aud.items.root / "customer_purchases.parquet")["item_idx"].value_counts()
    item = aud.items.items.set_index("item_idx").loc[counts.index[0], "item_id"]
    buyers = bought(aud, [item])
    assert len(buyers) >= 3
    default = aud.audience(Campaign([item], len(aud) - len(buyers)))
    assert not buyers & set(default["customer_id"])
    kept = aud.audience(Campaign([item], len(aud)), Filters(exclude_buyers=False))
    assert buyers <= set(kept["customer_id"])


def test_segment_filter(aud):
    item = aud.items.items["item_id"].iloc[11]
    stage = aud.customers["lifecycle"].value_counts().index[0]
    table = aud.audience(Campaign([item], 10), Filters(segments=parse_segments([f"lifecycle={stage}"])))
    assert (table["segment"] == stage).all() and len(table) == 10
    ok = (
        aud.eligible(aud.items.item_idx([item]), Filters()) & (aud.customers["lifecycle"] == stage).to_numpy()
    )
    assert table["customer_id"].tolist() == exact_audience(aud, [item], ok, 10)
    both = aud.audience(
        Campaign([item], 5), Filters(segments=parse_segments(["rfm_r=3", "rfm_r=2", f"{stage}"]))
    )
    assert set(aud.customers.set_index("customer_id").loc[both["customer_id"], "rfm_r"].astype(str)) <= {
        "2",
        "3",
    }
    assert parse_segments(["R3F2M1"]) == {"rfm_segment": {"R3F2M1"}}
    with pytest.raises(AudienceError, match="unknown column"):
        parse_segments(["colour=red"])


def test_cap_across_campaigns(aud):
    items = aud.items.items["item_id"].iloc[[2, 3, 4]].tolist()  # neighbours: overlapping audiences
    campaigns = [Campaign([i], 30) for i in items]
    free = aud.batch(campaigns)
    assert free["customer_id"].duplicated().any()  # without the cap, customers repeat
    capped = aud.batch(campaigns, max_per_customer=1)
    assert not capped["customer_id"].duplicated().any()
    assert capped.groupby("campaign").size().tolist() == [30, 30, 30]
    two = aud.batch(campaigns, max_per_customer=2)
    assert two["customer_id"].value_counts().max() == 2
    # Assigned where they score highest: a customer eligible for another campaign, scoring there above
    # that campaign's last member, was kept out only by the cap, so their own audience scores them higher.
    vec = aud.items.embeddings[aud.items.rows(items)]
    score = pd.DataFrame(
        aud.embeddings @ vec.T, index=aud.customers["customer_id"], columns=[c.name for c in campaigns]
    )
    ok = {
        c.name: pd.Series(aud.eligible(aud.items.item_idx(c.items), Filters()), index=score.index)
        for c in campaigns
    }
    last = capped.groupby("campaign")["score"].min()
    contested = 0
    for cust, camp in zip(capped["customer_id"], capped["campaign"], strict=True):
        for other in last.index.drop(camp):
            if ok[other][cust] and score.loc[cust, other] > last[other] + 1e-6:
                contested += 1
                assert score.loc[cust, camp] >= score.loc[cust, other] - 1e-6
    assert contested > 0


def test_one_line_errors(aud, tmp_path):
    item = aud.items.items["item_id"].iloc[0]
    with pytest.raises(AudienceError, match="unknown item id"):
        aud.audience(Campaign(["no-such-item"], 5))
    with pytest.raises(AudienceError, match="empty campaign"):
        Campaign([], 5)
    with pytest.raises(AudienceError, match="beyond the"):
        aud.audience(Campaign([item], len(aud) + 1))
    bad = tmp_path / "opt.txt"
    bad.write_text("C1\nC2, C3\n")
    with pytest.raises(AudienceError, match=r"opt.txt: row 2: expected one customer id"):
        read_opt_outs(bad)
    bad_csv = tmp_path / "opt.csv"
    bad_csv.write_text("email\nx@y\n")
    with pytest.raises(AudienceError, match=r"opt.csv: row 1: expected a header with a customer_id"):
        read_opt_outs(bad_csv)
    good = tmp_path / "ok.csv"
    good.write_text("customer_id,reason\nA,mail\nB,\n")
    assert read_opt_outs(good) == {"A", "B"}
    txt = tmp_path / "ok.txt"
    txt.write_text("# opt-outs\nA\n\nB  # by phone\n")
    assert read_opt_outs(txt) == {"A", "B"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "towerrec.commands.audience", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # three CLI processes; the API's options and errors have quick tests above
def test_cli_writes_csv_and_parquet_and_refuses_in_one_line(aud, customer_exports, tmp_path):
    export = str(customer_exports["flat"])
    items = aud.items.items["item_id"].iloc[[5, 6]].tolist()
    opt = tmp_path / "opt.txt"
    top = aud.audience(Campaign([items[0]], 3))["customer_id"].tolist()
    opt.write_text("\n".join(top) + "\n")
    csv_out, pq_out = tmp_path / "a.csv", tmp_path / "b.parquet"
    r = _cli(
        "--export", export, "--item", items[0], "-k", "12", "--exclude-file", str(opt), "--out", str(csv_out)
    )
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(csv_out, dtype={"customer_id": str})
    assert len(table) == 12 and not set(top) & set(table["customer_id"])
    r = _cli("--export", export, "--campaign", items[0], "--campaign", items[1], "-k", "20",
             "--max-per-customer", "1", "--out", str(pq_out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    batch = pd.read_parquet(pq_out)
    assert (
        batch.groupby("campaign").size().tolist() == [20, 20] and not batch["customer_id"].duplicated().any()
    )
    for args, message in [
        (["--item", "nope", "-k", "5"], "unknown item id"),
        (["--item", items[0], "-k", str(len(aud) + 1)], "beyond the"),
        (["--item", items[0], "--exclude-file", str(tmp_path / "missing.txt")], "not found"),
        (["--campaign", ",", "-k", "5"], "empty campaign"),
    ]:
        r = _cli("--export", export, *args)
        assert r.returncode != 0
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = _cli("--export", str(customer_exports["plain"]), "--item", items[0])
    assert r.returncode != 0 and "users=true" in r.stderr and "Traceback" not in r.stderr
