"""Recognising the wrappers DDP, DataParallel and ``torch.compile`` put around a model.

Policy (see :func:`sharify.sharify`, :func:`sharify.save`): operations that only *read* a model
(``save``, ``verify``) look through wrappers (``save`` with a ``UserWarning``, as the file then
holds the bare model); operations that *rewrite* it (``sharify``, ``load``
into a given model, ``retie``) refuse them, because the wrapper has already captured the
parameters (DDP's gradient buckets, dynamo's guards) and would not see the rewrite.

A wrapper's ``state_dict`` has the bare model's keys under its attribute: ``module.`` (DDP,
DataParallel) or ``_orig_mod.`` (``torch.compile``); :func:`strip_wrapper_prefixes` removes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from torch import nn

__all__ = ["WRAPPER_PREFIXES", "is_wrapper", "strip_wrapper_prefixes", "unwrap"]

#: The key prefixes a wrapper's ``state_dict`` adds: DDP and DataParallel, ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

V = TypeVar("V")


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


def strip_wrapper_prefixes(state_dict: Mapping[str, V]) -> dict[str, V]:
    """``state_dict`` with the wrappers' key prefixes removed, in any nesting.

    A prefix is removed only when every key has it, so a model with a submodule called ``module``
    keeps its keys; ``module._orig_mod.`` goes as well as ``_orig_mod.module.``.
    """
    out = dict(state_dict)
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if out and all(k.startswith(p) for k in out)), None)
        if prefix is None:
            return out
        out = {k[len(prefix) :]: v for k, v in out.items()}
