"""Errors of the fine-tuning tools: bad data and bad checkpoints.

Both are :class:`~sharify.SharifyError` subclasses, so the command line reports them as one line
naming the file at fault and the fix.
"""

from __future__ import annotations

from ..errors import SharifyError

__all__ = ["CheckpointError", "DataError"]


class DataError(SharifyError):
    """A data set is missing, has the wrong layout or does not match the model."""


class CheckpointError(SharifyError):
    """A checkpoint is missing, corrupt, or belongs to another model or run."""
