"""Small pieces: no function in ``src/`` runs over about 80 lines unless its docstring says why."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "towerrec"
#: Lines from ``def`` to the last line, docstring included.
MAX_LINES = 80
REASON = "Long because"


def long_functions(root: Path, max_lines: int = MAX_LINES) -> list[str]:
    """``path:line name (n lines)`` of every function or method under ``root`` longer than ``max_lines``
    whose docstring does not contain :data:`REASON`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > max_lines and REASON not in (ast.get_docstring(node) or ""):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_long_function_without_a_reason():
    assert long_functions(SRC) == []


def test_the_walk_finds_a_long_function_and_accepts_a_reason(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    method = "\n".join(f"    {line}" for line in body.splitlines())
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        f"def short():\n    return 1\n\n\nclass C:\n    async def long(self):\n{method}\n\n\n"
        f'def explained():\n    """Sum.\n\n    {REASON} it lists every case.\n    """\n{body}\n'
    )
    assert long_functions(tmp_path / "pkg") == [f"pkg/m.py:6 long ({MAX_LINES + 1} lines)"]
