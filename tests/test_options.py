"""The README's documented options and command lines, each shrunk to a batch or two.

Covered elsewhere: every ``experiment=`` (test_train), resume (test_train, test_determinism), DDP,
``-m`` sweeps with ``aggregate_runs.py`` and the optuna sweeper (test_train), ``towerrec-similar``
queries (retrieval/test_similar_cli), ``towerrec-reproduce`` (test_reproduce).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TINY_DATA, TINY_TRAIN, compose_cfg

from towerrec.commands.similar import main as similar_main
from towerrec.commands.train import train
from towerrec.models.checkpoint import load_trained
from towerrec.models.components.image_encoder import TorchvisionEncoder
from towerrec.models.components.sequence_encoders import GRUEncoder


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _lr_logged(text: str) -> bool:
    return "lr-AdamW" in text


@pytest.mark.parametrize(
    "logger",
    [  # the default (csv) in the quick subset, the others with -m slow
        pytest.param("none", marks=pytest.mark.slow),
        "csv",
        pytest.param("tensorboard", marks=pytest.mark.slow),
        pytest.param(
            "mlflow",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason='needs the extra: pip install -e ".[mlflow]"'),
            ],
        ),
    ],
)
def test_every_logger_option_trains_with_the_default_callbacks(logger, tiny_processed_dir, tmp_path):
    tiny = [o for o in TINY_TRAIN if not o.startswith("logger=")]
    cfg = compose_cfg("train", [*TINY_DATA, f"data.processed_dir={tiny_processed_dir}", *tiny, f"logger={logger}"], tmp_path / "run")
    assert "lr_monitor" in cfg.callbacks  # the default callbacks, LR monitor included
    metrics = train(cfg)
    assert metrics.scores()["all"]["users"] > 0
    run = Path(cfg.paths.output_dir)
    if logger == "none":
        assert not (run / "csv").exists() and not (run / "tensorboard").exists()
    elif logger == "csv":
        (log,) = (run / "csv").glob("version_*/metrics.csv")
        assert _lr_logged(log.read_text()) and "val/ndcg@20" in log.read_text()
    elif logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        files = sorted((run / "tensorboard").glob("version_*/events.out.tfevents.*"))
        tags = {t for f in files for t in EventAccumulator(str(f)).Reload().Tags()["scalars"]}
        assert "val/ndcg@20" in tags and any(_lr_logged(t) for t in tags)
    else:  # the config's own store: SQLite in the run folder, read back through mlflow's client
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
        (run_info,) = client.search_runs([client.get_experiment_by_name("towerrec").experiment_id])
        keys = set(run_info.data.metrics)
        assert "val/ndcg20" in keys and any(_lr_logged(k) for k in keys), keys  # mlflow drops the "@"


def test_cfg_job_prints_what_would_run(tmp_path):
    proc = _cli("towerrec.commands.train", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deterministic: true" in proc.stdout and "_target_: towerrec.models.two_tower.TwoTowerModule" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # nothing ran


#: A value no random init gives: the local file's weights are recognised in the trained checkpoint.
MARK = 0.0123


def _resnet18_state(path: Path) -> Path:
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"].fill_(MARK)
    torch.save(state, path)
    return path


def _gru(model):
    assert isinstance(model.user_tower, GRUEncoder) and model.user_tower.gru.hidden_size == 32
    assert model.item_tower.dim == 32


def _no_image(model):
    assert model.item_tower.image_encoder is None
    assert not any("image_encoder" in k for k in model.state_dict())


def _resnet18(model):
    enc = model.item_tower.image_encoder
    assert isinstance(enc, TorchvisionEncoder) and isinstance(enc.backbone, torchvision.models.ResNet)
    assert torch.all(enc.backbone.conv1.weight == MARK)  # loaded from the local file, frozen since


@pytest.mark.parametrize(
    ("line", "took_effect"),
    [
        (["model/user_tower=gru", "model.dim=32"], _gru),
        (["model.item_tower.image_encoder=null"], _no_image),
        (["model/image_encoder@model.item_tower.image_encoder=resnet18", "model.item_tower.image_encoder.weights_path=WEIGHTS"], _resnet18),
        pytest.param(["trainer=gpu"], None, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
    ids=["gru_dim32", "no_image", "resnet18_local_weights", "gpu"],
)
@pytest.mark.slow
def test_readme_training_examples(line, took_effect, tiny_processed_dir, tmp_path):
    line = [o.replace("WEIGHTS", str(_resnet18_state(tmp_path / "resnet18.pth"))) for o in line]
    # The line picks or drops the image encoder, so the small CNN's tiny width does not apply.
    tiny = [o for o in TINY_TRAIN if "image_encoder.channels" not in o or "image_encoder" not in " ".join(line)]
    cfg = compose_cfg("train", [*TINY_DATA, f"data.processed_dir={tiny_processed_dir}", *tiny, *line], tmp_path / "run")
    metrics = train(cfg)
    assert 0.0 <= metrics.scores()["all"]["recall@20"] <= 1.0
    model, _ = load_trained(metrics.run["best_checkpoint"])  # the option as the trained checkpoint holds it
    if took_effect is not None:  # trainer=gpu: that it ran on CUDA is all it changes
        took_effect(model)


@pytest.mark.slow
def test_export_line_then_query_lines(tiny_train_cfg, tmp_path, capsys):
    metrics = train(tiny_train_cfg())
    out = tmp_path / "exports" / "hnsw"
    proc = _cli("towerrec.commands.export", f"ckpt_path={metrics.run['best_checkpoint']}", "index=hnsw", f"out_dir={out}",
                f"hydra.run.dir={tmp_path / 'export_run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 120 and "HNSW" in manifest["factory"]
    # towerrec-similar --export exports/hnsw --item <id> -k 10 --grid similar.png
    from towerrec.retrieval import load_export

    ids = load_export(out).items["item_id"].tolist()
    png = tmp_path / "similar.png"
    proc = _cli("towerrec.commands.similar", "--export", str(out), "--item", ids[0], "-k", "10", "--grid", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n|") >= 11 and png.read_bytes()[:4] == b"\x89PNG"
    # towerrec-similar --export exports/hnsw --history <id>,<id> --json (in-process: the same main)
    capsys.readouterr()  # what training printed
    similar_main(["--export", str(out), "--history", f"{ids[0]},{ids[41]}", "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["query"] == {"history": [ids[0], ids[41]]} and len(answer["results"]) == 10
