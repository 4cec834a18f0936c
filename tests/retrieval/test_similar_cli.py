"""``towerrec-similar``: JSON shape, table, grid PNG and error messages."""

from __future__ import annotations

import json

import pytest

from towerrec.commands.similar import main
from towerrec.retrieval import load_export


def _ids(exports, rows):
    return load_export(exports["hnsw"]).items["item_id"].iloc[rows].tolist()


def test_item_query_json(exports, capsys):
    (item,) = _ids(exports, [2])
    main(["--export", str(exports["hnsw"]), "--item", item, "-k", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["query"]["item_id"] == item
    assert len(out["results"]) == 3
    for r in out["results"]:
        assert {"item_id", "score", "title", "image", "is_cold"} <= set(r) and "because" not in r
        assert r["item_id"] != item and isinstance(r["score"], float)


def test_history_query_json_has_because(exports, capsys):
    history = _ids(exports, [1, 7, 30])
    exclude = _ids(exports, [60])
    args = [
        "--export",
        str(exports["hnsw"]),
        "--history",
        ",".join(history),
        "--exclude",
        exclude[0],
        "-k",
        "4",
        "--json",
    ]
    main(args)
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == {"history": history} and out["exclude"] == exclude
    assert len(out["results"]) == 4
    for r in out["results"]:
        assert r["because"] in history and r["item_id"] not in history + exclude


def test_table_and_grid(exports, tmp_path, capsys):
    (item,) = _ids(exports, [0])
    png = tmp_path / "grid.png"
    main(["--export", str(exports["flat"]), "--item", item, "-k", "5", "--grid", str(png)])
    out = capsys.readouterr().out
    assert "| # | item_id | score |" in " ".join(out.split()) and out.count("\n|") >= 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    png2 = tmp_path / "history.png"
    main(
        ["--export", str(exports["flat"]), "--history", ",".join(_ids(exports, [3, 4])), "--grid", str(png2)]
    )
    assert "because" in capsys.readouterr().out and png2.stat().st_size > 5000


def test_errors_are_one_line(exports, tmp_path):
    with pytest.raises(SystemExit, match="unknown item id"):
        main(["--export", str(exports["flat"]), "--item", "no-such-item"])
    with pytest.raises(SystemExit, match="no manifest.json"):
        main(["--export", str(tmp_path), "--item", "x"])
