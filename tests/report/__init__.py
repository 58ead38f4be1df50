"""Tests of :mod:`sharify.report` and the ``sharify report`` command."""
