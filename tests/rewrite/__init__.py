"""Tests of :mod:`sharify.rewrite`: the shared model, its init strategies and alignment, verify/retie, wrappers."""
