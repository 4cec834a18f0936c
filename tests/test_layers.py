"""The layering rules on the real import graph: ranking is torch only, and models/ and retrieval/ rank
through it, never through evaluation/ (which keeps slices, baselines, reports and statistics); the
graph has no cycles; an item-to-item query reaches no model code."""

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


def _graph() -> dict[str, set[str]]:
    """towerrec module -> the towerrec modules it imports: every import statement, at module level, in
    functions and under ``TYPE_CHECKING``; ``from package import name`` counts as the submodule when
    ``name`` is one, else as the package."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # import a.b.c of a module: the longest known prefix
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules that has one (iterative DFS)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return found


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    assert {"towerrec.retrieval.load", "towerrec.serve.app", "towerrec.commands.train"} <= set(graph)
    assert "towerrec.retrieval.folder" in graph["towerrec.retrieval.load"]  # the graph sees real edges
    assert [" -> ".join(c) for c in _cycles(graph)] == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


#: What an item-to-item query uses: the package, loading and verifying an export, and the audiences.
ITEM_PATH = ("towerrec.retrieval", "towerrec.retrieval.load", "towerrec.retrieval.customers", "towerrec.serve.app")
#: The modules that import the training stack (``writer`` and ``recommend`` import the model code).
MODEL_CODE = ("towerrec.models", "towerrec.data.datamodule", "towerrec.retrieval.recommend", "towerrec.retrieval.writer")


@pytest.mark.parametrize("start", ITEM_PATH)
def test_item_to_item_modules_reach_no_model_code(start):
    """The one rule that keeps the training stack out of item queries, checked on every import
    (function-level ones included), except where a history query builds its ``Recommender``."""
    graph = _graph()
    if start == "towerrec.serve.app":  # the served export builds a Recommender at the first history query
        graph["towerrec.serve.state"] = graph["towerrec.serve.state"] - {"towerrec.retrieval.recommend"}
    reached = sorted(m for m in _reachable(graph, start) if m.startswith(MODEL_CODE))
    assert reached == []
