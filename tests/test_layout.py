"""The package layout: dependencies point one way (cli/train -> report -> io -> rewrite -> planning -> analysis ->
the foundation), with no cycle and no import hidden in a module ``__getattr__``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sharify"

#: Rank of each part: a module may import modules of its own rank or below, never above.
RANKS = {
    "sharify._version": 0,
    "sharify._paths": 0,
    "sharify._argtypes": 0,
    "sharify._wrappers": 0,
    "sharify.errors": 0,
    "sharify.layers": 0,
    "sharify.analysis": 1,
    "sharify.planning": 2,
    "sharify.rewrite": 3,
    "sharify.io": 4,
    "sharify.deploy": 4,
    "sharify.report": 5,
    "sharify.train": 6,
    "sharify.cli": 7,
    "sharify.__main__": 8,
    "sharify": 8,  # the package's __init__: the public API, re-exported from everywhere
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rank(module: str) -> int:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[best]


def _is_module(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/")).with_suffix(".py").exists()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every sharify module ``path`` imports (at the top or inside a function), as absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith("sharify"):
                # `from . import x` / `from ..io import atomic`: the names may be modules themselves
                subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
                found += [(node.lineno, t) for t in (subs or [target])]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("sharify")]
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_rank() -> None:
    for path in _modules():
        _rank(_module_name(path))  # raises ValueError (max of nothing) for a module outside RANKS


def test_imports_point_down_the_pipeline() -> None:
    wrong = []
    for path in _modules():
        name = _module_name(path)
        for line, target in _imports(path):
            if _rank(target) > _rank(name):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_getattr_shims() -> None:
    shims = [
        str(path.relative_to(PACKAGE.parent))
        for path in _modules()
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(path.read_text()).body)
    ]
    assert not shims


def test_subpackages_say_what_they_read_and_produce() -> None:
    for sub in ("analysis", "planning", "rewrite", "io", "deploy", "train"):
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
        assert doc and len(doc.split()) > 30, sub


def test_every_loaded_sharify_module_is_from_this_checkout() -> None:
    # An editable install of another checkout would serve modules this one no longer has (an old import path).
    import sys

    foreign = [
        name
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "sharify"
        and getattr(module, "__file__", None)
        and PACKAGE not in Path(module.__file__).resolve().parents
    ]
    assert not foreign


def test_readme_how_it_works_names_every_module_of_the_pipeline() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## How it works", 1)[1].split("\n## ", 1)[0]
    for sub in ("analysis", "planning", "rewrite", "io"):
        assert f"sharify/{sub}/" in section or f"{sub}/" in section, sub
        for path in sorted((PACKAGE / sub).glob("*.py")):
            if path.name != "__init__.py":
                assert f"`{path.name}`" in section or f" {path.name}" in section, f"{sub}/{path.name}"
