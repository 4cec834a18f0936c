"""The one checkpoint loader: rebuilds from the module's own hyperparameters, refuses pickles and foreign data."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from towerrec.commands.train import build
from towerrec.data.datamodule import SequenceDataModule
from towerrec.models.checkpoint import CheckpointError, load_trained, read_checkpoint
from towerrec.models.two_tower import TwoTowerModule


class _Payload:
    """Unpickling this object would create ``marker``: the test proves that never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_processed_dir):
    """A module built from the config and trained by a plain ``Trainer.fit`` (no towerrec-train)."""
    from conftest import TINY_DATA, TINY_TRAIN, compose_cfg

    root = tmp_path_factory.mktemp("plain_fit")
    cfg = compose_cfg("train", [*TINY_DATA, f"data.processed_dir={tiny_processed_dir}", *TINY_TRAIN], root)
    dm, model, _ = build(cfg)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=root)
    trainer.fit(model, datamodule=dm)
    path = root / "plain.ckpt"
    trainer.save_checkpoint(path)
    return path, model, dm


def test_plain_trainer_fit_checkpoint_rebuilds_the_same_model(fitted):
    path, model, dm = fitted
    loaded, loaded_dm = load_trained(path)
    assert isinstance(loaded_dm, SequenceDataModule) and loaded_dm.processed_dir == dm.processed_dir
    # The image cache is not copied on its way from the processed folder into the item tower.
    assert loaded.item_tower.images.data_ptr() == loaded_dm.item_features.images.data_ptr()
    model.eval()
    history = dm.test_split.history[:8]
    assert torch.equal(loaded.rank(history, 10), model.rank(history, 10))


def test_score_split_reports_image_diversity_of_the_ranked_lists(fitted):
    from towerrec.data.features import image_features
    from towerrec.evaluation.evaluator import score_split
    from towerrec.ranking import intra_list_diversity_at_k

    _, model, dm = fitted
    split = dm.test_split
    topk = model.eval().rank(split.history, 20)
    results, per_user = score_split(topk, split, dm.item_features, [10, 20])
    looks = image_features(dm.item_features.images, dm.item_features.has_image)
    assert results["all"]["image_diversity@10"] == pytest.approx(intra_list_diversity_at_k(topk, looks, 10))
    assert len(per_user) == len(split) and results["all"]["users"] <= len(split)


def test_plain_trainer_fit_checkpoint_exports(fitted, tmp_path):
    from retrieval.conftest import index_spec

    from towerrec.retrieval import load_export
    from towerrec.retrieval.writer import export_index

    out = export_index(fitted[0], index_spec("flat"), tmp_path / "export", n_queries=20)
    assert len(load_export(out)) == fitted[2].meta["num_items"]


def test_a_module_built_without_from_config_is_refused_with_a_reason(fitted, tmp_path):
    ckpt = torch.load(fitted[0], weights_only=True)
    del ckpt["hyper_parameters"]["config"]
    torch.save(ckpt, tmp_path / "no_config.ckpt")
    with pytest.raises(CheckpointError, match="no model config.*from_config"):
        load_trained(tmp_path / "no_config.ckpt")


@pytest.mark.slow
def test_pickled_payload_is_refused_in_one_line_and_never_runs(fitted, tmp_path):
    marker = tmp_path / "payload_ran"
    ckpt = torch.load(fitted[0], weights_only=True)
    ckpt["extra"] = _Payload(marker)
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad)
    assert str(bad) in str(err.value) and "objects other than weights" in str(err.value)
    for cmd in (
        ["towerrec.commands.evaluate", f"ckpt_path={bad}", f"out_dir={tmp_path / 'eval'}"],
        ["towerrec.commands.export", f"ckpt_path={bad}", f"out_dir={tmp_path / 'export'}", "index=flat"],
        ["towerrec.commands.train", f"ckpt_path={bad}", f"paths.output_dir={tmp_path / 'train'}", "logger=none"],
    ):
        proc = _run(*cmd, cwd=tmp_path)
        assert proc.returncode != 0, proc.stdout
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and str(bad) in last and "objects other than weights" in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr + proc.stdout
    assert not marker.exists(), "the pickled payload ran"


@pytest.mark.slow
def test_checkpoint_trained_on_other_data_is_refused_naming_both_hashes(fitted, tmp_path):
    ckpt = torch.load(fitted[0], weights_only=True)
    ckpt["hyper_parameters"]["meta"]["config_hash"] = "f" * 64
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    current = fitted[2].manifest["config_hash"]
    with pytest.raises(CheckpointError, match=f"ffffffffffff.*{current[:12]}.*force=true"):
        load_trained(other)
    model, _ = load_trained(other, force=True)
    assert isinstance(model, TwoTowerModule)
    proc = _run("towerrec.commands.evaluate", f"ckpt_path={other}", f"out_dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode != 0 and "ffffffffffff" in proc.stderr and current[:12] in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run("towerrec.commands.evaluate", f"ckpt_path={other}", f"out_dir={tmp_path / 'eval'}", "force=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_missing_or_foreign_files_get_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "absent.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        read_checkpoint(tmp_path / "junk.ckpt")
