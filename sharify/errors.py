"""The exceptions sharify raises: the one home of the library's exception family.

Bad *arguments* raise the built-in ``TypeError``/``ValueError``; models, inputs, files and data that
sharify cannot handle raise a subclass of :class:`SharifyError` (several also derive from the built-in
exception a caller would catch without knowing sharify: ``ValueError``, ``TypeError``, ``OSError``).
:mod:`sharify.train`'s errors subclass these (``except sharify.CheckpointError`` catches a bad training
checkpoint too). Every message names the module, value or file at fault and says what to try.
"""

from __future__ import annotations

__all__ = [
    "AlreadySharifiedError",
    "CheckpointError",
    "ExampleInputsError",
    "ExportError",
    "NothingToShareError",
    "PretrainedWeightsError",
    "RecipeMismatchError",
    "SharifyError",
    "UnsupportedModelError",
    "TieError",
    "UntraceableError",
]


class SharifyError(Exception):
    """Root of the exceptions sharify raises for models it cannot handle."""


class NothingToShareError(SharifyError):
    """The model has no residual stage with two or more convs that could share one weight."""


class UntraceableError(SharifyError):
    """torch.fx cannot trace the part of the model that holds the residual stages."""


class UnsupportedModelError(SharifyError, TypeError):
    """The object is a kind of model sharify cannot rewrite (e.g. a TorchScript module)."""


class PretrainedWeightsError(SharifyError, OSError):
    """A library's pretrained weights cannot be fetched: no internet connection and no cached copy."""


class AlreadySharifiedError(SharifyError):
    """The model already contains shared convs; sharify refuses to share twice."""


class ExampleInputsError(SharifyError, ValueError):
    """The example inputs do not fit the model (wrong rank, channels or size)."""


class CheckpointError(SharifyError, ValueError):
    """A sharify checkpoint file cannot be read: missing, corrupted, truncated or not written by sharify."""


class RecipeMismatchError(CheckpointError):
    """A sharify checkpoint does not fit the model it is loaded into (a path or shape differs)."""


class TieError(SharifyError):
    """The sharing of a model is broken in a way :func:`sharify.retie` cannot repair."""


class ExportError(SharifyError):
    """An exported file (ONNX, ``torch.export``) does not keep the sharing: a shared tensor is stored more than
    once, or is missing, or the exported model's outputs differ from the PyTorch model's."""
