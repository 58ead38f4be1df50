"""sharify's tests, laid out like the package they test.

``tests/analysis``, ``tests/planning``, ``tests/rewrite``, ``tests/io``, ``tests/report`` and ``tests/train``
test the package of the same name (``tests/report`` also the ``sharify report`` command of ``sharify/cli.py``);
``tests/benchmarks`` tests the scripts under ``benchmarks/`` and the results committed there. The files at this
level test the project as a whole: the README's examples and figures, every docstring example, the package
layout and the exception family.

Shared by all of them:

* ``conftest.py``: the fixtures (a fixed seed, one thread) and ``state_equal`` / ``perturb``;
* ``nets.py``: the networks the tests build, written as users write them (and the CIFAR ResNets of the paper
  rows, re-exported from ``benchmarks/cifar_models.py``); ``foreign_nets.py``: model code in the habits of
  other projects;
* ``fake_data.py``: small datasets written to disk (an image folder, Fashion-MNIST's idx files).

A network that exists only to show one odd pattern to one test stays next to that test.

Every directory is a package, so test modules are imported as ``tests.<part>.test_<topic>`` and may share a
basename; run the suite from the repository root (``python -m pytest``), where ``tests`` is importable.
"""
