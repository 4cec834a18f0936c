"""The rolling split: K=1 is today's temporal split, and no fold sees its test window or anything later."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict

from tests.conftest import TINY_DATA, compose_cfg
from towerrec.backtest import fold_data_configs, prepare_folds
from towerrec.data.build import ensure_prepared
from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.schema import DataError
from towerrec.evaluation.baselines import Popularity, recent_counts

FOLDS = ["data.split.method=rolling", "+data.split.folds=3", "+data.split.window_days=5", "data.split.val_days=4"]


def data_cfg(tmp, *overrides):
    cfg = compose_cfg("prepare", [*TINY_DATA, f"data.processed_dir={tmp / 'processed'}", *overrides], tmp)
    return cfg.data


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default temporal split (test_days=10, val_days=10) of the tiny shop: every interaction."""
    tmp = tmp_path_factory.mktemp("full")
    cfg = data_cfg(tmp)
    out = ensure_prepared(cfg, workers=1)
    return out, _raw_rows(out)


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rolling")
    cfg = data_cfg(tmp, *FOLDS)
    return cfg, prepare_folds(cfg, workers=1), [c.processed_dir for c in fold_data_configs(cfg)]


def _raw_rows(folder) -> pd.DataFrame:
    """Interactions with raw user and item ids (fold folders number users and items on their own)."""
    inter = pd.read_parquet(f"{folder}/interactions.parquet")
    users = pd.read_parquet(f"{folder}/users.parquet").set_index("user_idx")["user_id"]
    items = pd.read_parquet(f"{folder}/items.parquet").set_index("item_idx")["item_id"]
    return inter.assign(user_id=users.loc[inter["user_idx"]].to_numpy(), item_id=items.loc[inter["item_idx"]].to_numpy())


def test_one_fold_is_the_temporal_split(full, tmp_path):
    """K=1 with window_days = test_days and the same val_days builds today's folder, table for table."""
    cfg = data_cfg(tmp_path, "data.split.method=rolling", "+data.split.folds=1", "+data.split.window_days=10")
    (manifest,) = prepare_folds(cfg, workers=1)
    (folder,) = [c.processed_dir for c in fold_data_configs(cfg)]
    for name in ("interactions", "items", "users"):
        pd.testing.assert_frame_equal(pd.read_parquet(f"{folder}/{name}.parquet"), pd.read_parquet(full[0] / f"{name}.parquet"))
    for name in ("item_categorical", "item_text", "images"):
        assert np.array_equal(np.load(f"{folder}/{name}.npy"), np.load(full[0] / f"{name}.npy"))
    full_split = pd.read_json(full[0] / "manifest.json", typ="series")["split"]
    for key in ("method", "val_start", "test_start", "test_days", "val_days"):
        assert manifest["split"][key] == full_split[key]
    assert "test_end" not in manifest["split"]


def test_fold_windows_are_consecutive(folds):
    cfg, manifests, _ = folds
    splits = [m["split"] for m in manifests]
    assert [s["rolling"]["fold"] for s in splits] == [0, 1, 2]
    last_day = pd.Timestamp(splits[0]["rolling"]["last_day"])
    assert pd.Timestamp(splits[-1]["test_start"]) == last_day - pd.Timedelta(days=5)  # the temporal split's cut
    assert "test_end" not in splits[-1]
    for s, later in zip(splits, splits[1:], strict=False):
        assert s["test_end"] == later["test_start"]
        assert pd.Timestamp(s["test_end"]) - pd.Timestamp(s["test_start"]) == pd.Timedelta(days=5)
    for s in splits:
        assert pd.Timestamp(s["test_start"]) - pd.Timestamp(s["val_start"]) == pd.Timedelta(days=4)


def test_no_fold_sees_its_test_window_or_later(full, folds):
    """Every fold: rows after its test window are dropped (and counted), training precedes validation,
    validation precedes test; training counts, histories, seen items and popularity come from before the cut."""
    _, all_rows = full
    cfg, manifests, dirs = folds
    for manifest, folder in zip(manifests, dirs, strict=True):
        split = manifest["split"]
        val_start, test_start = pd.Timestamp(split["val_start"]), pd.Timestamp(split["test_start"])
        end = pd.Timestamp(split["test_end"]) if "test_end" in split else None
        rows = _raw_rows(folder)
        expected = all_rows if end is None else all_rows[all_rows["timestamp"] < end]
        assert split.get("dropped_after_end", 0) == len(all_rows) - len(expected)
        key = ["user_id", "item_id", "timestamp"]
        pd.testing.assert_frame_equal(
            rows[key].sort_values(key, ignore_index=True), expected[key].sort_values(key, ignore_index=True)
        )
        ts = rows["timestamp"]
        assert (ts[rows["split"] == "train"] < val_start).all()
        assert ((ts[rows["split"] == "val"] >= val_start) & (ts[rows["split"] == "val"] < test_start)).all()
        assert (ts[rows["split"] == "test"] >= test_start).all()
        assert (rows["split"] == "test").any() and (rows["split"] == "val").any()
        if end is not None:
            assert (ts < end).all()

        # Item training counts (cold items, popularity features) from the fold's training rows only.
        items = pd.read_parquet(f"{folder}/items.parquet")
        before_val = all_rows[all_rows["timestamp"] < val_start]["item_id"].value_counts()
        assert items.set_index("item_id")["train_count"].to_dict() == {
            i: int(before_val.get(i, 0)) for i in items["item_id"]
        }

        dm = SequenceDataModule(folder, max_len=10, batch_size=32, max_history=10_000, mask_seen=True)
        dm.setup()
        user_ids = dm.users.set_index("user_idx")["user_id"]
        item_ids = items.set_index("item_idx")["item_id"]
        for name, cut in (("val", val_start), ("test", test_start)):
            s = dm.eval_split(name)
            before = all_rows[all_rows["timestamp"] < cut].groupby("user_id")["item_id"].apply(sorted).to_dict()
            for row, u in enumerate(s.user_idx.tolist()):
                hist = sorted(item_ids.loc[[i for i in s.history[row].tolist() if i]].tolist())
                seen = sorted(item_ids.loc[[i for i in s.seen[row].tolist() if i]].tolist())
                assert hist == seen == before.get(user_ids.loc[u], [])
        pop = Popularity().fit(dm)
        train_items = all_rows.loc[all_rows["timestamp"] < val_start, "item_id"].value_counts()
        assert {item_ids.loc[i]: int(c) for i, c in enumerate(pop.counts.tolist()) if c} == train_items.to_dict()
        recent = recent_counts(dm, "test", days=3)
        window = all_rows[(all_rows["timestamp"] >= test_start - pd.Timedelta(days=3)) & (all_rows["timestamp"] < test_start)]
        assert {item_ids.loc[i]: int(c) for i, c in enumerate(recent.tolist()) if c} == window["item_id"].value_counts().to_dict()


def test_rolling_options_are_checked(tmp_path):
    rolling = ["data.split.method=rolling", "+data.split.folds=2"]
    for overrides, field in (
        (["data.split.method=rolling", "+data.split.folds=0"], "data.split.folds"),
        ([*rolling, "+data.split.window_days=x"], "data.split.window_days"),
        ([*rolling, "+data.split.window_days=0"], "data.split.window_days"),
        ([*rolling, "+data.split.test_start=2020-01-01"], "data.split.test_start"),
        ([*rolling, "+data.split.fold=2"], "data.split.fold"),
    ):
        with pytest.raises(DataError, match=field):
            fold_data_configs(data_cfg(tmp_path, *overrides))
    cfg = data_cfg(tmp_path, "data.split.method=rolling", "+data.split.folds=2", "+data.split.window_days=5")
    with pytest.raises(DataError, match="data.split.fold: a rolling split is prepared one fold at a time"):
        ensure_prepared(cfg, workers=1)
    with open_dict(cfg):
        cfg.split.folds = 40  # 200 days of windows in a 120-day shop: the oldest folds are empty
    with pytest.raises(DataError, match="data.split.folds: fold 0 of 40 has no"):
        prepare_folds(cfg, workers=1)
