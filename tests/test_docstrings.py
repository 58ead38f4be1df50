"""Every docstring example (``Example:`` sections, doctest syntax) of sharify and sharify.train runs as written.

Examples that read Fashion-MNIST are marked ``# doctest: +SKIP`` in the docstrings (a fresh machine need
not have the Debian package ``dataset-fashion-mnist``, so ``python -m doctest`` must not fail there). Here
they run anyway: the skip is lifted and the system directory points at a small fake dataset in Fashion-MNIST's
own idx layout, so no example is left unexecuted.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings
from pathlib import Path

import pytest

import sharify
import sharify.train.data
from tests.fake_data import fake_fashion_mnist

# `sharify.__main__` runs the command line when imported; it has no docstring examples.
NOT_IMPORTED = {"sharify.__main__"}
SUBMODULES = [info.name for info in pkgutil.walk_packages(sharify.__path__, "sharify.")]
MODULES = ["sharify", *sorted(name for name in SUBMODULES if name not in NOT_IMPORTED)]


def _docstrings() -> dict[str, doctest.DocTest]:
    """Every docstring of the modules, parsed (re-exported objects are found once, under their own module)."""
    found: dict[str, doctest.DocTest] = {}
    for name in MODULES:
        for test in doctest.DocTestFinder().find(importlib.import_module(name)):
            found.setdefault(test.name, test)
    return found


DOCSTRINGS = _docstrings()
DOCTESTS = {name: test for name, test in DOCSTRINGS.items() if test.examples}


def test_every_example_section_is_a_doctest() -> None:
    """The walk reaches both packages, and no ``Example:`` section is written in a form doctest would not run."""
    assert {"sharify.train", "sharify.train.finetune", "sharify.rewrite.apply"} <= set(MODULES)
    sections = {name for name, test in DOCSTRINGS.items() if "Example:" in (test.docstring or "")}
    assert sections == set(DOCTESTS)
    expected = {
        "sharify.rewrite.apply.sharify",
        "sharify.planning.plan.plan",
        "sharify.train",
        "sharify.train.finetune.finetune",
    }
    assert expected <= sections


@pytest.mark.parametrize("name", sorted(DOCTESTS))
def test_docstring_example_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files (runs/demo) write here
    monkeypatch.setattr(sharify.train.data, "FASHION_MNIST_SYSTEM_DIR", fake_fashion_mnist(tmp_path / "fmnist"))
    test = DOCTESTS[name]
    for example in test.examples:
        example.options.pop(doctest.SKIP, None)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # fresh globals each run (the runner clears the ones it is given)
        fresh = doctest.DocTest(test.examples, dict(test.globs), test.name, test.filename, test.lineno, test.docstring)
        result = runner.run(fresh)
    assert result.attempted == len(test.examples) > 0
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"
    assert [str(w.message) for w in caught] == []
