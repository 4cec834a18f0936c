"""Preparation: ids, splits without leakage, manifest no-op, bad input through the whole pipeline."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import HM_ROOT, TINY_DATA, compose_cfg, needs_hm

from towerrec.data.build import PrepareSettings, config_hash, is_up_to_date, prepare
from towerrec.data.datamodule import SequenceDataModule, train_windows
from towerrec.data.schema import DataError


def _data_cfg(tmp_path, *overrides):
    return compose_cfg("prepare", [*TINY_DATA, f"data.processed_dir={tmp_path}/proc", *overrides], tmp_path).data


@pytest.fixture(scope="module")
def temporal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("temporal")
    out = prepare(_data_cfg(tmp))
    return out, pd.read_parquet(out / "interactions.parquet"), pd.read_parquet(out / "items.parquet")


def test_ids_are_contiguous_with_zero_reserved(temporal):
    out, inter, items = temporal
    assert items["item_idx"].tolist() == list(range(1, len(items) + 1))
    assert inter["item_idx"].min() >= 1 and inter["user_idx"].min() >= 1
    users = pd.read_parquet(out / "users.parquet")
    assert sorted(users["user_idx"]) == list(range(1, len(users) + 1))
    assert np.load(out / "images.npy", mmap_mode="r").shape[0] == len(items) + 1


def test_temporal_split_has_no_leakage(temporal):
    out, inter, items = temporal
    manifest = json.loads((out / "manifest.json").read_text())
    val_start = pd.Timestamp(manifest["split"]["val_start"])
    test_start = pd.Timestamp(manifest["split"]["test_start"])
    train = inter[inter["split"] == "train"]
    assert train["timestamp"].max() < val_start
    assert inter.loc[inter["split"] == "val", "timestamp"].between(val_start, test_start, inclusive="left").all()
    assert (inter.loc[inter["split"] == "test", "timestamp"] >= test_start).all()
    # cold = no training interaction, exactly
    warm = set(train["item_idx"])
    assert set(items.loc[~items["is_cold"], "item_idx"]) == warm


def test_leave_one_out_split_has_no_leakage(tmp_path):
    out = prepare(_data_cfg(tmp_path, "data.split.method=leave_one_out"))
    inter = pd.read_parquet(out / "interactions.parquet")
    for _, g in inter.groupby("user_idx"):
        labels = g["split"].tolist()
        if len(g) >= 3:
            assert labels[-1] == "test" and labels[-2] == "val" and set(labels[:-2]) == {"train"}
            # training never sees anything later than the held-out items
            assert g["timestamp"].iloc[:-2].max() <= g["timestamp"].iloc[-2]
        else:
            assert set(labels) == {"train"}


def test_evaluation_histories_stop_at_the_cut(temporal):
    out, inter, _ = temporal
    dm = SequenceDataModule(str(out), max_len=10, max_history=1000)
    dm.setup()
    for split, allowed in ((dm.val_split, {"train"}), (dm.test_split, {"train", "val"})):
        u = int(split.user_idx[0])
        rows = inter[(inter["user_idx"] == u) & inter["split"].isin(allowed)]
        hist = split.history[0][split.history[0] > 0].tolist()
        assert hist == rows["item_idx"].tolist()[-len(hist):] if hist else rows.empty
        targets = set(split.targets[0][split.targets[0] > 0].tolist())
        assert targets == set(inter[(inter["user_idx"] == u) & (inter["split"] == split.name)]["item_idx"])
    # no training window contains a validation or test item at its position
    train_items = set(inter.loc[inter["split"] == "train", "item_idx"])
    seen = set(dm.train_data.tensors["targets"].unique().tolist()) - {0}
    assert seen <= train_items


def test_prepare_is_a_noop_on_unchanged_inputs_and_redone_on_change(tmp_path):
    cfg = _data_cfg(tmp_path)
    out = prepare(cfg)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert is_up_to_date(cfg)
    prepare(cfg)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    changed = _data_cfg(tmp_path, "data.split.test_days=5")
    assert not is_up_to_date(changed)
    prepare(changed)
    assert json.loads((out / "manifest.json").read_text())["split"]["test_days"] == 5


def test_config_hash_ignores_where_the_data_lives(tmp_path):
    a = compose_cfg("train", ["data=hm", "data.root=/one/checkout/../shared/data/hm"], tmp_path).data
    b = compose_cfg("train", ["data=hm", "data.root=/b/hm", "data.processed_dir=/tmp/elsewhere"], tmp_path).data
    assert config_hash(a) == config_hash(b)
    c = compose_cfg("train", ["data=hm", "data.root=/b/hm", "data.split.test_days=7"], tmp_path).data
    assert config_hash(c) != config_hash(a)


# Data hashes as reported before prepare took typed settings and the sources moved into a package
# (README: H&M 383b3d42...). The same config must keep its hash.
REPORTED_HASHES = {
    "synthetic": "ed4ee903ec95d07965d182291d8d5a913ab919f6988caae6f3338f802b4ec534",
    "hm": "383b3d424f9f3d927f384c87f4e2157bbec7d10d80076dd9627cbf7aacd69a8e",
    "movielens": "d697cf6f25d1d28b7b2666c92d887d0e8c6151b53371040808f6cb73c5d86db8",
    "table": "bbc085d29424c7683a8da842ec4b1bcfa9ae766aeaf8a34d50553a6707bb7140",
}


@pytest.mark.parametrize("name", sorted(REPORTED_HASHES))
def test_config_hash_is_unchanged_for_the_same_config(tmp_path, name):
    cfg = compose_cfg("train", [f"data={name}"], tmp_path).data
    assert config_hash(cfg) == REPORTED_HASHES[name]
    assert PrepareSettings.from_config(cfg).config_hash == REPORTED_HASHES[name]
    tiny = compose_cfg("train", TINY_DATA, tmp_path).data
    assert config_hash(tiny) == "d206f677f9f8c6ccf0c38dddd68f79a45a7042407fc781a157cdd290912b213c"


def test_settings_are_typed_and_bad_fields_are_named(tmp_path):
    s = PrepareSettings.from_config(_data_cfg(tmp_path, "data.split.test_days=5"))
    assert s.split.method == "temporal" and s.split.test_days == 5 and s.text.buckets == 4096
    assert s.image_size == 16 and s.processed_dir == tmp_path / "proc"
    for override, message in [
        ("+data.split.test_dayz=3", r"^data\.split\.test_dayz: unknown setting \(known: method, test_days"),
        ("data.split.method=random", r"^data\.split\.method: unknown split method 'random'"),
        ("data.text.buckets=many", r"^data\.text\.buckets: expected an integer, got 'many'"),
        ("data.filter.kcore=3", r"^data\.filter\.kcore: expected true or false, got 3"),
        ("data.split.test_days=null", r"^data\.split\.test_days: the temporal split needs test_days"),
    ]:
        with pytest.raises(DataError, match=message):
            PrepareSettings.from_config(_data_cfg(tmp_path, override))


def test_synthetic_preparation_is_deterministic(tmp_path):
    a = prepare(_data_cfg(tmp_path / "a"))
    b = prepare(_data_cfg(tmp_path / "b"))
    pd.testing.assert_frame_equal(pd.read_parquet(a / "interactions.parquet"), pd.read_parquet(b / "interactions.parquet"))
    assert np.array_equal(np.load(a / "images.npy"), np.load(b / "images.npy"))


def test_train_windows_are_all_position_next_item():
    user = np.array([1, 1, 1, 1, 1, 2, 2])
    item = np.array([10, 11, 12, 13, 14, 20, 21])
    x, y = train_windows(user, item, max_len=3)
    assert x.tolist() == [[11, 12, 13], [0, 0, 10], [0, 0, 20]]
    assert y.tolist() == [[12, 13, 14], [0, 0, 11], [0, 0, 21]]


def test_datamodule_batch_shapes(temporal):
    out, _, items = temporal
    dm = SequenceDataModule(str(out), max_len=12, batch_size=8, eval_batch_size=5, max_history=7)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (8, 12) and batch["targets"].shape == (8, 12)
    assert torch.equal(batch["inputs"] == 0, batch["targets"] == 0)
    vb = next(iter(dm.val_dataloader()))
    assert vb["history"].shape == (5, 7) and vb["targets"].shape[0] == 5
    f = dm.item_features
    n = len(items) + 1
    assert f.images.shape == (n, 16, 16, 3) and f.images.dtype == torch.uint8
    assert f.categorical.shape[0] == n and f.text.shape[0] == n and f.is_cold.shape == (n,)


def test_bad_table_input_gives_one_line_error(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    (root / "interactions.csv").write_text("user_id,item_id\nu1,i1\n")
    cfg = compose_cfg("prepare", ["data=table", f"data.root={root}", f"data.processed_dir={tmp_path}/p"], tmp_path).data
    with pytest.raises(DataError, match=r"interactions\.csv.*timestamp") as err:
        prepare(cfg)
    assert "\n" not in str(err.value)


def test_corrupt_and_missing_images_become_counted_placeholders(tmp_path):
    from PIL import Image

    root = tmp_path / "t"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (20, 30), (200, 0, 0)).save(root / "img" / "a.jpg")
    (root / "img" / "b.jpg").write_bytes(b"not a jpeg")
    rows = [f"u{u},{i},2024-01-{d:02d}" for u in range(4) for d, i in enumerate("abc", start=1)]
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    (root / "items.csv").write_text("item_id,image\na,img/a.jpg\nb,img/b.jpg\nc,img/c.jpg\n")
    cfg = compose_cfg(
        "prepare",
        ["data=table", f"data.root={root}", f"data.processed_dir={tmp_path}/p", "data.source.items=items.csv",
         "+data.source.item_columns={item_id: item_id, image: image}", "data.split.method=leave_one_out",
         "data.image_size=8"],
        tmp_path,
    ).data
    out = prepare(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["corrupt_file"] == 1
    assert manifest["images"]["missing_file"] == 1
    items = pd.read_parquet(out / "items.parquet").set_index("item_id")
    assert items["has_image"].to_dict() == {"a": True, "b": False, "c": False}
    images = np.load(out / "images.npy")
    assert images[items.loc["a", "item_idx"]].mean() > 50 and images[items.loc["b", "item_idx"]].max() == 0


@pytest.mark.hm
@needs_hm
@pytest.mark.slow
def test_hm_temporal_cut_reproduces_the_readme(tmp_path):
    """README: from 2020-08-23, 861 of the 1,211 held-out purchases are of articles not bought before."""
    cfg = compose_cfg(
        "prepare",
        ["data=hm", f"data.root={HM_ROOT}", f"data.processed_dir={tmp_path}/hm", "data.source.same_day_repeats=keep",
         "data.split.val_days=0", "data.image_size=8"],
        tmp_path,
    ).data
    out = prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["split"]["test_start"] == "2020-08-23"
    assert m["counts"]["interactions"] == 31_662 and m["counts"]["users"] == 1_364
    assert m["counts"]["items"] == 24_717 and m["counts"]["items_never_interacted"] == 7_684
    assert m["counts"]["test"] == 1_211 and m["counts"]["test_cold_interactions"] == 861
    assert m["images"].get("corrupt_file", 0) == 0 and m["counts"]["items_with_image"] == 24_717
