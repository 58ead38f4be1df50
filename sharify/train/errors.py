"""Errors of the fine-tuning tools: bad data and bad checkpoints.

Both belong to the library's exception family (:mod:`sharify.errors`): :class:`CheckpointError`
subclasses :class:`sharify.CheckpointError`, so ``except sharify.CheckpointError`` catches a bad
training checkpoint as well as a bad :func:`sharify.load` file. Their messages are written in the
command line's terms (``--out``, ``--resume-fallback``), which is why they are classes of their own:
the command line reports them as one line naming the file at fault and the fix, as they are.
"""

from __future__ import annotations

from .. import errors

__all__ = ["CheckpointError", "DataError"]


class DataError(errors.SharifyError):
    """A data set is missing, has the wrong layout or does not match the model."""


class CheckpointError(errors.CheckpointError):
    """A training checkpoint is missing, corrupt, or belongs to another model or run."""
