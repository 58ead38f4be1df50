"""Tests of :mod:`sharify.analysis`: tracing, shape propagation, residual blocks and stages, descending into parts."""
