"""The out-of-core prepare (DuckDB): same output as the in-memory pandas pipeline, timestamp outliers, chunks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HAS_HM, HM_ROOT, compose_cfg

from towerrec.data import build, engine
from towerrec.data.build import prepare
from towerrec.data.schema import DataError
from towerrec.data.sources import synthetic
from towerrec.data.sources.table import load_table

# Digests of the processed tables that the pandas pipeline (towerrec 0.1.0 before the engine) wrote, from
# `_digests` below. Price means and spend sums are rounded: the engine adds them with exactly rounded
# sums (fsum), which may differ from pandas in the last bit (14 of 28,516 H&M prices, relative 1e-16).
PANDAS_PIPELINE = {
    "synthetic": {
        "interactions": "97d54fd5cb45bc18",
        "users": "71196c50df076fb0",
        "items": "7c32d4992b48b136",
    },
    "hm": {"interactions": "9e016162b933cf4a", "users": "4bfb21c4c5a49f50", "items": "b254eb8359595a6c"},
}


def _digests(folder: Path) -> dict[str, str]:
    """Rows (raw ids, integer ids, time, split, quantity, channel, price), users with segments, item counts."""
    inter = pd.read_parquet(folder / "interactions.parquet")
    users = pd.read_parquet(folder / "users.parquet")
    items = pd.read_parquet(folder / "items.parquet")
    rows = pd.DataFrame(
        {
            "user": users.set_index("user_idx")["user_id"].reindex(inter["user_idx"]).to_numpy(),
            "item": items.set_index("item_idx")["item_id"].reindex(inter["item_idx"]).to_numpy(),
            "ts": inter["timestamp"].to_numpy(dtype="datetime64[ns]").view("i8"),
            "split": inter["split"].astype(str).to_numpy(),
            "user_idx": inter["user_idx"].to_numpy(),
            "item_idx": inter["item_idx"].to_numpy(),
        }
    )
    for c in ("quantity", "channel", "price"):
        if c in inter:
            rows[c] = inter[c].to_numpy()
    if "price" in rows:
        rows["price"] = rows["price"].round(12)
    users = users.assign(monetary=users["monetary"].round(9))
    cols = ["item_idx", "item_id", "train_count", "train_users", "is_cold", "has_image"]

    def h(df: pd.DataFrame) -> str:
        return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()[:16]

    return {"interactions": h(rows), "users": h(users), "items": h(items[cols])}


@pytest.mark.parametrize("users_per_part", [None, 701])
def test_synthetic_default_is_what_the_pandas_pipeline_wrote(tmp_path, monkeypatch, users_per_part):
    """Also with users.parquet written a part of the users at a time (3,000 users in 5 parts)."""
    if users_per_part:
        monkeypatch.setattr(build, "_USERS_PER_PART", users_per_part)
    cfg = compose_cfg("prepare", [f"data.processed_dir={tmp_path}/p"], tmp_path).data
    out = prepare(cfg)
    assert _digests(out) == PANDAS_PIPELINE["synthetic"]
    assert len(pd.read_parquet(out / "users.parquet")) == 3000
    inter = pd.read_parquet(out / "interactions.parquet")
    assert str(inter["timestamp"].dtype) == "datetime64[ns]" and list(inter["split"].cat.categories) == [
        "train",
        "val",
        "test",
    ]


@pytest.mark.hm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_HM, reason=f"H&M sample not found at {HM_ROOT}")
def test_hm_is_what_the_pandas_pipeline_wrote(tmp_path):
    cfg = compose_cfg(
        "prepare", ["data=hm", f"data.root={HM_ROOT}", f"data.processed_dir={tmp_path}/p"], tmp_path
    )
    out = prepare(cfg.data)
    assert _digests(out) == PANDAS_PIPELINE["hm"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["repaired"]["same_day_repeat_merged"] == 3146
    assert (
        manifest["skipped"]["timestamp_after_clock"] == 0
        and manifest["skipped"]["timestamp_isolated_tail"] == 0
    )


def _shop(root: Path, extra: list[str]) -> Path:
    """200 distinct purchases over 60 days of 2021 (10 users, 20 items), then ``extra`` lines."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["user_id,item_id,timestamp"]
    for k in range(200):
        day = pd.Timestamp("2021-03-01") + pd.Timedelta(days=int(k * 60 / 200))
        lines.append(f"u{k % 10},i{k * 7 % 20},{day.date()}")
    (root / "interactions.csv").write_text("\n".join(lines + extra) + "\n")
    return root


def _table_cfg(tmp_path: Path, root: Path, *more: str):
    overrides = ["data=table", f"data.root={root}", f"data.processed_dir={tmp_path}/p"]
    overrides += ["data.split.test_days=10", "data.split.val_days=10", "data.image_size=8", *more]
    return compose_cfg("prepare", overrides, tmp_path).data


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["u1,i1,2091-05-01", "u2,i2,2091-05-02", "u3,i3,2099-01-01"], "timestamp_after_clock"),
        (["u1,i1,2024-06-01", "u2,i2,2024-06-03"], "timestamp_isolated_tail"),
    ],
    ids=["after_clock", "isolated_tail"],
)
def test_implausible_timestamps_are_counted_skips_and_leave_the_split_alone(tmp_path, extra, reason):
    out = prepare(_table_cfg(tmp_path, _shop(tmp_path / "raw", extra)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"][reason] == len(extra)
    # The split is the one of the plausible rows: test from 10 days before their last day, validation non-empty.
    assert manifest["split"]["test_start"] == "2021-04-19" and manifest["split"]["val_start"] == "2021-04-09"
    assert manifest["counts"]["interactions"] == 200 and manifest["counts"]["val"] > 0
    inter = pd.read_parquet(out / "interactions.parquet")
    assert inter["timestamp"].max() < pd.Timestamp("2021-05-01")


def test_implausible_timestamps_can_stop_the_run_in_one_line(tmp_path):
    root = _shop(tmp_path / "raw", ["u9,i9,2091-05-01"])
    with pytest.raises(
        DataError, match=r"^interactions\.csv: implausible timestamps: 1 row\(s\) dated after .*row 201, user .u9."
    ) as e:
        prepare(_table_cfg(tmp_path, root, "data.time.outliers=error"))
    assert "\n" not in str(e.value)


def test_a_gap_holding_much_of_the_data_is_not_an_outlier(tmp_path):
    """Two seasons a year apart, the later one a fifth of the rows: real data, kept."""
    late = [f"u{k % 10},i{k % 20},2022-09-{1 + k % 25:02d}" for k in range(50)]
    out = prepare(_table_cfg(tmp_path, _shop(tmp_path / "raw", late)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["timestamp_isolated_tail"] == 0 and manifest["counts"]["interactions"] == 250


def test_chunks_give_the_same_rows_and_the_file_row_numbers(tmp_path):
    root = _shop(tmp_path / "raw", ["u0,i0,2021-03-01", "u0,i0,2021-03-01"])  # two repeats of data row 1
    whole = load_table(str(root), "interactions.csv")
    chunked = load_table(str(root), "interactions.csv", chunk_rows=7)
    pd.testing.assert_frame_equal(whole.interactions, chunked.interactions)
    assert whole.skipped == chunked.skipped and chunked.skipped["duplicate_row"] == 2
    assert len(chunked.interactions) == 200
    lines = (root / "interactions.csv").read_text().splitlines()
    lines[150] = "u1,i1,someday"  # data row 150, in the 22nd chunk of 7
    (root / "interactions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"^interactions\.csv: row 150, column 'timestamp': unparsable timestamp 'someday'"
    ):
        load_table(str(root), "interactions.csv", chunk_rows=7)


def test_the_engine_path_of_a_source_equals_its_frame(tmp_path, monkeypatch):
    """Given the build's connection a source leaves its rows in the engine: the same rows, in several chunks."""
    monkeypatch.setattr(synthetic, "CHUNK_INTERACTIONS", 3_000)
    params = dict(n_users=300, n_items=120, n_interactions=12_000, image_size=8, seed=5)
    frame = synthetic.generate_synthetic(**params).interactions
    with engine.connect(engine.EngineSettings(memory_limit="256MB", threads=1), tmp_path / "scratch") as con:
        data = synthetic.generate_synthetic(con=con, **params)
        assert data.interactions == "inter"
        rows = engine.to_frame(con, "inter")
    pd.testing.assert_frame_equal(rows, frame)
    assert not (tmp_path / "scratch").exists()  # the scratch database and spill files are removed


def test_memory_lowered_hands_duckdb_pages_back_and_restores_the_limit(tmp_path):
    settings = engine.EngineSettings(memory_limit="512MB", threads=1)
    with engine.connect(settings, tmp_path / "scratch") as con:
        limit = engine.scalar(con, "SELECT current_setting('memory_limit')")
        con.execute("CREATE TABLE t AS SELECT hash(range) AS i, md5(range::VARCHAR) AS s FROM range(1000000)")
        total = engine.scalar(con, "SELECT sum(i::HUGEINT) FROM t WHERE s LIKE '%7a%'")
        in_memory = "SELECT sum(memory_usage_bytes) FROM duckdb_memory()"
        assert engine.scalar(con, in_memory) > 16 * 2**20  # the table's pages stay after the query
        with engine.memory_lowered(con, "4MB", settings):
            assert engine.scalar(con, in_memory) <= 4 * 2**20
            assert engine.scalar(con, "SELECT current_setting('memory_limit')") != limit
        assert engine.scalar(con, "SELECT current_setting('memory_limit')") == limit
        assert engine.scalar(con, "SELECT sum(i::HUGEINT) FROM t WHERE s LIKE '%7a%'") == total  # reloaded from the file
        with pytest.raises(KeyError), engine.memory_lowered(con, "4MB", settings):
            raise KeyError("a step fails")
        assert engine.scalar(con, "SELECT current_setting('memory_limit')") == limit


def _segments_by_join(activity, n_users, train_end, new_days, active_days):
    """The earlier ``customer_segments``: a frame of every user joined to the per-user aggregates."""
    seg = pd.DataFrame(index=pd.Index(np.arange(1, n_users + 1), name="user_idx"))
    agg = activity[["first", "last", "frequency", "monetary"]].copy()
    agg["recency_days"] = (train_end - agg["last"]).dt.total_seconds() / 86400.0

    def q3(x, ascending):
        r = x.rank(method="first", ascending=ascending)
        return pd.qcut(r, 3, labels=[1, 2, 3]).astype(int) if len(x) >= 3 else pd.Series(2, index=x.index)

    agg["rfm_r"] = q3(agg["recency_days"], ascending=False)
    agg["rfm_f"] = q3(agg["frequency"], ascending=True)
    agg["rfm_m"] = q3(agg["monetary"], ascending=True)
    days_since_first = (train_end - agg["first"]).dt.total_seconds() / 86400.0
    agg["lifecycle"] = pd.Categorical.from_codes(
        np.where(days_since_first <= new_days, 0, np.where(agg["recency_days"] <= active_days, 1, 2)),
        build.LIFECYCLE,
    )
    seg = seg.join(agg[["recency_days", "frequency", "monetary", "rfm_r", "rfm_f", "rfm_m", "lifecycle"]])
    seg["lifecycle"] = seg["lifecycle"].fillna("no_history")
    for c in ("rfm_r", "rfm_f", "rfm_m"):
        seg[c] = seg[c].fillna(0).astype(int)
    code = np.where(seg["rfm_r"] > 0, (seg["rfm_r"] - 1) * 9 + (seg["rfm_f"] - 1) * 3 + seg["rfm_m"], 0)
    seg["rfm_segment"] = pd.Categorical.from_codes(code, build.RFM_SEGMENTS)
    return seg.reset_index()


@pytest.mark.parametrize(("n_users", "active"), [(500, 500), (500, 337), (50, 2), (7, 3)])
def test_customer_segments_by_position_equal_the_join(n_users, active):
    """Every user, some users without history (NaN, rfm 0, no_history), ties in every score, fewer than 3."""
    rng = np.random.default_rng(active)
    users = np.sort(rng.choice(np.arange(1, n_users + 1), size=active, replace=False))
    end = pd.Timestamp("2024-03-01")
    last = end - pd.to_timedelta(rng.integers(0, 20, active), unit="D")  # ties in recency
    first = last - pd.to_timedelta(rng.integers(0, 90, active), unit="D")
    activity = pd.DataFrame(
        {
            "n_train": rng.integers(1, 9, active),
            "first": first.to_numpy(),
            "last": last.to_numpy(),
            "frequency": rng.integers(1, 4, active),  # ties
            "monetary": rng.choice([1.0, 2.5, 10.0], active),  # ties
        },
        index=pd.Index(users, name="user_idx"),
    )
    got = build.customer_segments(activity, n_users, end, 30, 10)
    rfm = ["rfm_r", "rfm_f", "rfm_m"]
    assert (got[rfm].dtypes == np.int8).all()  # one byte a score in memory; users.parquet stores BIGINT
    got[rfm] = got[rfm].astype(np.int64)
    pd.testing.assert_frame_equal(got, _segments_by_join(activity, n_users, end, 30, 10), check_exact=True)
    assert (got["lifecycle"] == "no_history").sum() == n_users - active
