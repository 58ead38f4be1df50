"""Tests of :mod:`sharify.train`: fine-tuning, its loop and checkpoints, data, DDP, the ``sharify finetune`` command."""
