"""Recognising the wrappers DDP, DataParallel and ``torch.compile`` put around a model.

Policy (see :func:`sharify.sharify`, :func:`sharify.save`): operations that only *read* a model
(``save``, ``verify``) look through wrappers (``save`` with a ``UserWarning``, as the file then
holds the bare model); operations that *rewrite* it (``sharify``, ``load``
into a given model, ``retie``) refuse them, because the wrapper has already captured the
parameters (DDP's gradient buckets, dynamo's guards) and would not see the rewrite.
"""

from __future__ import annotations

from torch import nn

__all__ = ["is_wrapper", "unwrap"]


def _inner(model: nn.Module) -> nn.Module | None:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    if type(model).__name__ == "OptimizedModule":  # torch.compile; avoid importing torch._dynamo
        inner = getattr(model, "_orig_mod", None)
        return inner if isinstance(inner, nn.Module) else None
    return None


def is_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is a DDP, DataParallel or ``torch.compile`` wrapper."""
    return _inner(model) is not None


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The bare model inside any nesting of wrappers, and the wrappers' class names (outermost first)."""
    names: list[str] = []
    inner = _inner(model)
    while inner is not None:
        names.append(type(model).__name__)
        model, inner = inner, _inner(inner)
    return model, names
