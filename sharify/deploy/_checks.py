"""The argument checks the deployment transforms share."""

from __future__ import annotations

import torch
from torch import nn

from .._wrappers import is_wrapper
from ..errors import UnsupportedModelError

__all__ = ["check_model_and_flag"]


def check_model_and_flag(model: object, inplace: object, caller: str) -> None:
    """Refuses what ``caller`` cannot rewrite: no module, a non-bool ``inplace``, TorchScript, a wrapper.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``inplace`` not a bool.
        UnsupportedModelError: A TorchScript module, or a DDP / DataParallel / ``torch.compile`` wrapper.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"got a TorchScript module; {caller} rewrites eager modules: call it before torch.jit.script"
        )
    if is_wrapper(model):
        raise UnsupportedModelError(
            f"got a {type(model).__name__} wrapper; {caller} rewrites the model, so pass the bare model "
            f"({caller}(wrapped.module) for DDP / DataParallel, {caller}(compiled._orig_mod) for torch.compile) "
            "and wrap the result"
        )
