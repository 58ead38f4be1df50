"""Passes, not long functions: no function in ``sharify/`` runs over 60 lines of code unless it says why.

A function's code is its lines from ``def`` to its last statement, less its docstring (nested functions count
in the function around them too). One over the limit passes only if its docstring contains ``Long:`` followed by
the reason it is clearer in one piece.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sharify"
LIMIT = 60
REASON = re.compile(r"Long:[ \t]*\S")  # the reason starts on the same line

#: Functions over the limit, by ``file::name``, each with its reason for being here.
ALLOWED: set[str] = set()


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    assert node.end_lineno is not None
    lines = node.end_lineno - node.lineno + 1
    if ast.get_docstring(node, clean=False) is not None:
        doc = node.body[0]
        assert doc.end_lineno is not None
        lines -= doc.end_lineno - doc.lineno + 1
    return lines


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{name}::{node.name}", node))
    return found


def test_no_function_is_long_without_a_reason() -> None:
    long = [
        f"{where} ({_code_lines(node)} lines)"
        for where, node in _functions()
        if _code_lines(node) > LIMIT
        and where not in ALLOWED
        and not REASON.search(ast.get_docstring(node, clean=False) or "")
    ]
    assert not long, (
        f"functions over {LIMIT} lines of code (docstring excluded): {', '.join(long)}; split them into named "
        "passes (small functions with docstrings, like torch.fx's passes), or give the reason one piece is "
        "clearer after 'Long:' in the docstring"
    )


def test_the_measure_sees_long_functions_and_reasons() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    plain = ast.parse(f'def f():\n    """Doc.\n\n    More."""\n{body}\n    return x0\n').body[0]
    short = ast.parse(f'def f():\n    """Doc."""\n{body}\n').body[0]
    assert isinstance(plain, ast.FunctionDef) and isinstance(short, ast.FunctionDef)
    assert _code_lines(plain) == LIMIT + 2 and _code_lines(short) == LIMIT + 1
    assert REASON.search("Does it all.\n\nLong: one loop over the graph reads best whole.")
    assert not REASON.search("Long:  \n") and not REASON.search("Long:\n\n    Args:")
    assert any(where == "sharify/rewrite/apply.py::apply_plan" for where, _ in _functions())
