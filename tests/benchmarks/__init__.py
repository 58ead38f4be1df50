"""Tests of the scripts under ``benchmarks/`` and of the results committed there."""
