"""Errors of the fine-tuning tools: bad data and bad checkpoints.

Both live in :mod:`sharify.errors` with the rest of the library's exception family and are
re-exported here: ``sharify.train.CheckpointError is sharify.CheckpointError``, so one ``except``
catches a bad training checkpoint and a bad :func:`sharify.load` file alike, and the command line
reports either as one line naming the file at fault and the fix.
"""

from __future__ import annotations

from ..errors import CheckpointError, DataError

__all__ = ["CheckpointError", "DataError"]
