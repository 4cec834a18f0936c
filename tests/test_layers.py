"""The layering rule on the real import graph: ranking is torch only, and models/ and retrieval/ rank
through it, never through evaluation/ (which keeps slices, baselines, reports and statistics)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "towerrec"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", ["models", "retrieval"])
def test_models_and_retrieval_import_nothing_from_evaluation(folder):
    offenders = {
        str(p.relative_to(SRC)): sorted(m for m in _imports(p) if m.startswith("towerrec.evaluation"))
        for p in (SRC / folder).rglob("*.py")
    }
    assert {p: m for p, m in offenders.items() if m} == {}


def test_ranking_imports_torch_and_the_standard_library_only():
    third_party = {m.split(".")[0] for m in _imports(SRC / "ranking.py")} - {"__future__", "functools", "math"}
    assert third_party <= {"torch", "collections"}, third_party


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_only_commands_import_commands():
    offenders = {
        _module(p): sorted(m for m in _imports(p) if m.startswith("towerrec.commands"))
        for p in SRC.rglob("*.py")
        if "commands" not in p.relative_to(SRC).parts
    }
    assert {p: m for p, m in offenders.items() if m} == {}


def test_no_two_modules_share_a_name():
    by_name: dict[str, list[str]] = {}
    for p in SRC.rglob("*.py"):
        if p.name != "__init__.py":
            by_name.setdefault(p.stem, []).append(_module(p))
    assert {n: m for n, m in by_name.items() if len(m) > 1} == {}
