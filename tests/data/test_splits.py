"""The one history rule: the DataModule and the baselines build every split's histories alike."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from towerrec import CONFIG_DIR
from towerrec.data.build import ensure_prepared
from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.splits import EVAL_SPLITS, history_splits
from towerrec.evaluation.baselines import history_before_cut


def test_history_rule_is_leakage_safe():
    assert history_splits("val") == ("train",)
    assert history_splits("test") == ("train", "val")
    for split in EVAL_SPLITS:
        assert split not in history_splits(split)
    with pytest.raises(ValueError, match="unknown evaluation split 'train'"):
        history_splits("train")


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> SequenceDataModule:
    root = tmp_path_factory.mktemp("splits")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="prepare",
            overrides=[
                "data=synthetic",
                "data.source.n_users=120",
                "data.source.n_items=80",
                "data.source.n_interactions=2000",
                "data.image_size=8",
                f"data.processed_dir={root / 'processed'}",
            ],
        )
    ensure_prepared(cfg.data, workers=1)
    # mask_seen keeps each user's full history (not only the last max_history items) as `seen`.
    module = SequenceDataModule(str(root / "processed"), max_history=5, mask_seen=True)
    module.setup()
    return module


@pytest.mark.parametrize("split_name", EVAL_SPLITS)
def test_datamodule_and_baselines_read_the_same_history(dm, split_name):
    split = dm.eval_split(split_name)
    hist = history_before_cut(dm, split_name)
    assert len(split) > 0
    by_user = hist.groupby("user_idx", sort=False)["item_idx"].apply(list)
    for row, user in enumerate(split.user_idx.tolist()):
        seen = split.seen[row]
        model_history = seen[seen != 0].tolist()
        assert model_history == by_user.get(user, []), f"user {user}: histories differ at {split_name}"
        truncated = split.history[row][split.history[row] != 0].tolist()
        assert truncated == model_history[-dm.max_history :]
        assert split.history_len[row] == len(model_history)
    # No held-out interaction of the split itself is in anybody's history.
    assert not np.isin(hist["split"].astype(str).unique(), [split_name]).any()


def test_image_cache_stays_memory_mapped_from_the_file(dm):
    """The DataModule's image tensor is the file's pages, not a copy in RAM (README: memory-mapped)."""
    images = dm.item_features.images
    path = str((dm.processed_dir / "images.npy").resolve())
    ptr = images.data_ptr()
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if line.rstrip().endswith(path)]
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
    assert any(lo <= ptr < hi for lo, hi in ranges), f"images tensor at {ptr:#x} is not inside a mapping of {path}"
    assert images.shape[0] == dm.meta["num_items"] + 1
