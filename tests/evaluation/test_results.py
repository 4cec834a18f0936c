"""The one results record: a round trip through the file, and one-line refusals of anything else,
the shapes written before the record existed included, by every reader."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from towerrec import PROJECT_ROOT
from towerrec.evaluation.report import load_results
from towerrec.evaluation.results import (
    FORMAT,
    VERSION,
    ModelResult,
    Results,
    ResultsError,
    read_results,
    single,
)

DATA = {"name": "synthetic", "config_hash": "abc123", "split": {"method": "temporal"}}
SLICES = {"all": {"recall@20": 0.25, "ndcg@20": 0.125, "users": 40}, "cold_items": {"recall@20": math.nan, "users": 0}}

#: What each command wrote before the record, as the files of earlier versions hold them.
OLD_SHAPES = {
    "train": {"test": SLICES, "val": {"best_ndcg@20": 0.1}, "best_checkpoint": "x.ckpt", "best_epoch": 3, "seed": 0,
              "data": DATA},
    "eval, one scorer": {**SLICES, "model": "popularity", "split": "test", "data": DATA},
    "eval, several": {"models": {"popularity": SLICES, "random": SLICES}, "split": "test", "data": DATA},
    "backtest": {"test": SLICES, "val": {}, "folds": [{"fold": 0, "test": SLICES}], "seed": 0, "data": DATA},
    "reproduce": {"header": {"seeds": [0]}, "models": {"fusion": {"kind": "trained", "metrics": SLICES}}},
    "audience (audience.json)": {"models": {"two_tower": {"all": {"items": 3, "recall@100": 0.5}}}, "paired": [],
                                 "split": "test", "data": DATA, "items": 3, "cutoffs": {"100": 100}},
}  # fmt: skip


def test_round_trip_keeps_every_field(tmp_path):
    record = Results(
        "reproduce",
        "test",
        DATA,
        {
            "fusion": ModelResult("trained", SLICES, std={"all": {"recall@20": 0.01}},
                                  interval={"all": {"recall@20": [0.2, 0.3]}}, details={"seeds": [0, 1]}),
            "popularity": ModelResult("baseline", SLICES),
        },
        header={"seeds": [0, 1], "k": 20},
    )  # fmt: skip
    path = record.write(tmp_path / "reproduce.json")
    raw = json.loads(path.read_text())
    assert (raw["format"], raw["version"], raw["kind"]) == (FORMAT, VERSION, "reproduce")
    back = read_results(path)
    assert back.models["fusion"].metrics["cold_items"]["recall@20"] is None  # NaN is written as null
    back.models["fusion"].metrics["cold_items"]["recall@20"] = math.nan
    back.models["popularity"].metrics["cold_items"]["recall@20"] = math.nan
    assert repr(back) == repr(record)  # every field, nested values included (NaN compares by repr)
    table = load_results(tmp_path)
    assert set(table["model"]) == {"fusion", "popularity"}
    assert set(table.loc[table["model"] == "popularity", "kind"]) == {"baseline"}
    row = table[(table["model"] == "fusion") & (table["slice"] == "all") & (table["metric"] == "recall")]
    assert row[["k", "value", "std"]].values.tolist() == [[20, 0.25, 0.01]]


def test_single_scorer_record_and_its_scores(tmp_path):
    record = single("train", "test", DATA, "two_tower", SLICES, val={"best_ndcg@20": 0.1}, run={"seed": 3})
    assert record.models["two_tower"].role == "trained" and record.scores() is SLICES
    back = read_results(record.write(tmp_path / "metrics.json"))
    assert back.kind == "train" and back.val == {"best_ndcg@20": 0.1} and back.run == {"seed": 3}
    assert single("eval", "val", DATA, "popularity", SLICES).models["popularity"].role == "baseline"
    two = Results("eval", "test", DATA, {"a": ModelResult("baseline", {}), "b": ModelResult("baseline", {})})
    with pytest.raises(ResultsError, match="2 scorers in this eval record"):
        two.scores()


@pytest.mark.parametrize("shape", list(OLD_SHAPES))
def test_old_shapes_are_refused_in_one_line_naming_the_file(shape, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(OLD_SHAPES[shape]))
    for reader in (read_results, load_results):
        with pytest.raises(ResultsError) as refused:
            reader(path)
        message = str(refused.value)
        assert message == f"{path}: not a towerrec results record of version 1 (no format field); re-run the command that wrote it"


def _record(**changes) -> dict:
    raw = single("eval", "test", DATA, "popularity", SLICES).as_dict()
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{oops", "not JSON"),
        ("[1, 2]", "(a JSON list, not an object)"),
        (_record(format="other"), "(format 'other', expected 'towerrec.results')"),
        (_record(version=2), "(version 2)"),
        (_record(kind="sweep"), "(results kind 'sweep' is not one of train, eval, backtest, reproduce, audience)"),
        (_record(models={"popularity": {"role": "oracle", "metrics": {}}}), "role 'oracle' is not one of"),
        (_record(models={"popularity": {"metrics": {}}}), "(models.popularity.role missing or not a str)"),
        (_record(models={"popularity": {"role": "baseline", "metrics": {}, "extra": 1}}), "models.popularity is not"),
        (_record(split=None), "(field 'split' missing or not a str)"),
        (_record(folds={}), "(field 'folds' missing or not a list)"),
        (_record(test={}), "(unknown field(s) test)"),
    ],
)
def test_anything_else_is_refused_in_one_line(content, why, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ResultsError) as refused:
        read_results(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and why in message and "\n" not in message


def test_aggregate_runs_reads_records_and_refuses_old_ones(tmp_path):
    sweep = tmp_path / "sweep"
    for job, recall in (("0", 0.25), ("1", 0.5)):
        (sweep / job).mkdir(parents=True)
        record = single("train", "test", DATA, "two_tower", {"all": {"recall@20": recall}}, val={"best_ndcg@20": recall},
                        run={"seed": int(job)})  # fmt: skip
        record.write(sweep / job / "metrics.json")
    script = [sys.executable, str(PROJECT_ROOT / "scripts" / "aggregate_runs.py"), str(sweep)]
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run(script, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = (sweep / "summary.csv").read_text()
    assert "0.25" in summary and "0.5" in summary
    (sweep / "1" / "metrics.json").write_text(json.dumps(OLD_SHAPES["train"]))
    proc = subprocess.run(script, capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {sweep / '1' / 'metrics.json'}: not a towerrec results record of version 1 (no format field); re-run the command that wrote it"
