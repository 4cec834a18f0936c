"""towerrec-compare on per-user files written by hand: pairing, refusals, and the printed table."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from towerrec.commands.compare import compare, main
from towerrec.evaluation.per_user import read_per_user, write_per_user
from towerrec.evaluation.results import single

DATA = {"name": "synthetic", "config_hash": "abc123"}


def frame(recall: list[float], cold: list[float]) -> pd.DataFrame:
    n = len(recall)
    return pd.DataFrame(
        {"user_idx": range(1, n + 1), "all/recall@20": recall, "all/map@12": recall, "cold_items/recall@20": cold}
    )


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split("|")]


@pytest.fixture
def two_files(tmp_path):
    a = write_per_user(frame([1.0] * 40, [1.0, math.nan] * 20), tmp_path / "a.parquet", "fusion", "test", DATA)
    b = write_per_user(frame([0.0] * 40, [1.0, math.nan] * 20), tmp_path / "b.parquet", "popularity", "test", DATA)
    return a, b


def test_metadata_round_trips(two_files):
    table, meta = read_per_user(two_files[0])
    assert meta == {"model": "fusion", "split": "test", "data": DATA} and len(table) == 40


def test_cli_prints_one_row_per_slice_and_metric(two_files, capsys, tmp_path):
    main([str(two_files[0]), str(two_files[1]), "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert "A - B on the test split of synthetic (data hash abc123)" in out
    rows = [line for line in out.splitlines() if line.startswith("| all") or line.startswith("| cold")]
    assert len(rows) == 3  # all/recall@20, all/map@12, cold_items/recall@20; no warm_items columns
    (recall,) = [r for r in rows if "| all " in r and "recall@20" in r]
    assert cells(recall)[5:] == ["1.0000", "[+1.0000, +1.0000]", "0.0001", "better"]  # p = 1 / 10,001
    (cold,) = [r for r in rows if r.startswith("| cold_items")]
    assert cells(cold)[2] == "20"  # users with a cold target
    assert cells(cold)[5:] == ["0.0000", "[+0.0000, +0.0000]", "1.0000", "not distinguishable"]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["a"]["model"] == "fusion" and len(saved["rows"]) == 3


def test_different_data_or_split_is_refused_in_one_line(two_files, tmp_path, capsys):
    other = write_per_user(frame([0.0] * 40, [0.0] * 40), tmp_path / "c.parquet", "popularity", "test", {**DATA, "config_hash": "zzz"})
    with pytest.raises(SystemExit) as exc:
        main([str(two_files[0]), str(other)])
    message = str(exc.value)
    assert message.startswith("towerrec-compare: ") and "\n" not in message
    assert "data hash abc123" in message and "data hash zzz" in message
    val = write_per_user(frame([0.0] * 40, [0.0] * 40), tmp_path / "d.parquet", "popularity", "val", DATA)
    with pytest.raises(ValueError, match="val split"):
        compare(two_files[0], val)


def test_a_train_run_folder_is_identified_by_its_metrics_json(two_files, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    frame([0.5] * 40, [0.0] * 40).to_parquet(run / "test_per_user.parquet", index=False)  # as towerrec-train writes it
    single("train", "test", {**DATA, "split": {"method": "temporal"}}, "two_tower", {}).write(run / "metrics.json")
    table, meta_a, meta_b = compare(run, two_files[1])
    assert meta_a == {"model": "two_tower", "split": "test", "data": DATA}
    assert table.set_index(["slice", "metric"]).loc[("all", "recall@20"), "mean_diff"] == 0.5
    # The shape towerrec-train wrote before the results record: refused in one line naming the file.
    (run / "metrics.json").write_text(json.dumps({"test": {}, "data": {**DATA, "split": {"method": "temporal"}}}))
    with pytest.raises(SystemExit) as refused:
        main([str(run), str(two_files[1])])
    message = str(refused.value)
    assert message.startswith("towerrec-compare: ") and "\n" not in message
    assert f"{run / 'metrics.json'}: not a towerrec results record of version 1 (no format field)" in message


def test_bad_inputs_give_one_line_errors(two_files, tmp_path):
    with pytest.raises(SystemExit, match="no such per-user results file"):
        main([str(tmp_path / "missing"), str(two_files[1])])
    lone = tmp_path / "lone.parquet"
    frame([0.0] * 4, [0.0] * 4).to_parquet(lone, index=False)
    with pytest.raises(SystemExit, match="no towerrec metadata in the file and no metrics.json beside it"):
        main([str(lone), str(two_files[1])])
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(SystemExit, match="not a parquet file"):
        main([str(tmp_path / "junk.parquet"), str(two_files[1])])
    with pytest.raises(SystemExit, match="share no metric column"):
        main([str(two_files[0]), str(two_files[1]), "--metrics", "ndcg@5"])
