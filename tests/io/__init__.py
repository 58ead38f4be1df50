"""Tests of :mod:`sharify.io`: save/load and the recipe, model sources, the model's own ties, atomic writes."""
