import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from towerrec import CONFIG_DIR
from towerrec.data.build import ensure_prepared
from towerrec.data.profile import PLOTS, summarize, write_report

SMALL = ["data.source.n_users=200", "data.source.n_items=150", "data.source.n_interactions=3000"]


def _compose(tmp: Path, *overrides: str):
    # No return_hydra_config: nothing here resolves paths.output_dir (${hydra:runtime.output_dir}).
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name="data_report",
            overrides=[f"data.processed_dir={tmp}/proc", f"out_dir={tmp}/report", *SMALL, *overrides],
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = _compose(tmp)
    processed = ensure_prepared(cfg.data, workers=1)
    report = write_report(processed, cfg.out_dir)
    return processed, report, json.loads((report.parent / "summary.json").read_text())


def test_report_and_plots_are_written(built):
    _, report, _ = built
    assert report.name == "report.md" and report.is_file()
    text = report.read_text()
    assert "## Headline" in text and "sparsity" in text
    for name in PLOTS:
        png = report.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in text  # the markdown embeds every plot


def test_summary_agrees_with_independent_counts(built):
    processed, _, s = built
    inter = pd.read_parquet(processed / "interactions.parquet")
    n_users = inter["user_idx"].nunique()
    n_items = len(pd.read_parquet(processed / "items.parquet"))
    assert s["users"] == n_users == 200
    assert s["items"] == n_items == 150
    assert s["interactions"] == len(inter) == 3000
    assert s["splits"] == {k: int((inter["split"] == k).sum()) for k in ("train", "val", "test")}
    assert 0 < s["sparsity"] < 1
    assert s["sparsity"] == pytest.approx(1 - 3000 / (200 * 150))

    # Cold: an item with no training interaction, computed here from the interactions alone.
    train_items = set(inter.loc[inter["split"] == "train", "item_idx"])
    test = inter[inter["split"] == "test"]
    cold = ~test["item_idx"].isin(train_items)
    pairs = test.drop_duplicates(["user_idx", "item_idx"])
    cold_pairs = ~pairs["item_idx"].isin(train_items)
    c = s["cold"]["test"]
    assert c["interactions"] == len(test) > 0
    assert c["cold_interactions"] == int(cold.sum()) > 0  # the synthetic shop releases items late
    assert c["cold_interaction_share"] == pytest.approx(cold.mean())
    assert c["cold_target_share"] == pytest.approx(cold_pairs.mean())
    assert c["users"] == test["user_idx"].nunique()
    assert c["users_with_cold_target"] == pairs.loc[cold_pairs, "user_idx"].nunique()
    assert s["cold_items"] == n_items - len(train_items)


def test_segment_tables_cover_all_and_test_users(built):
    processed, _, s = built
    users = pd.read_parquet(processed / "users.parquet")
    life = s["segments"]["lifecycle"]
    assert list(life["all"]) == ["new", "active", "lapsing", "no_history"]
    assert life["all"] == {k: int((users["lifecycle"] == k).sum()) for k in life["all"]}
    for col in ("lifecycle", "rfm_r", "rfm_f", "rfm_m"):
        assert sum(s["segments"][col]["all"].values()) == s["users"]
        assert sum(s["segments"][col]["test_users"].values()) == s["cold"]["test"]["users"]
    assert s["segments"]["rfm_r"]["all"]["0"] == int((users["n_train"] == 0).sum())


def test_leave_one_out_split_is_reported(tmp_path):
    cfg = _compose(tmp_path, "data.split.method=leave_one_out")
    report = write_report(ensure_prepared(cfg.data, workers=1), cfg.out_dir)
    s = json.loads((report.parent / "summary.json").read_text())
    assert "leave_one_out" in report.read_text()
    # One test interaction per user with at least 3 interactions.
    inter = pd.read_parquet(Path(cfg.data.processed_dir) / "interactions.parquet")
    sizes = inter.groupby("user_idx").size()
    assert s["splits"]["test"] == int((sizes >= 3).sum())
    # One target per test user: cold targets, cold interactions and users with a cold target coincide.
    c = s["cold"]["test"]
    assert c["targets"] == c["interactions"] == c["users"]
    assert c["cold_targets"] == c["cold_interactions"] == c["users_with_cold_target"]


def test_unprepared_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="towerrec-prepare"):
        summarize(tmp_path)


def test_cli_prepares_and_prints_the_report(tmp_path, monkeypatch, capsys):
    from towerrec.commands.data_report import main

    argv = [
        "towerrec-data-report",
        f"data.processed_dir={tmp_path}/proc",
        f"out_dir={tmp_path}/report",
        f"hydra.run.dir={tmp_path}/run",
        "workers=1",
        *SMALL,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    out = capsys.readouterr().out
    assert str(tmp_path / "report" / "report.md") in out.splitlines()  # Hydra's log lines go to stdout too
    assert '"interactions": 3000' in out
    assert (tmp_path / "proc" / "manifest.json").is_file()
