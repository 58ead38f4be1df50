"""Tests of :mod:`sharify.planning`: which convs form groups, the options and presets, the parameter arithmetic."""
