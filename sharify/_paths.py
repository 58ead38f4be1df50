"""Module paths: whether one path lies within another, and every path (alias) of one module or tensor.

A module registered under several attributes (``self.a = self.b = conv``) has several paths, and a
tensor tied by the model (``b.weight = a.weight``) several names; ``named_modules()`` and torch.fx
use the first, and so does sharify wherever it needs one (see :func:`names_by_identity`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["module_paths", "names_by_identity", "within"]


def within(path: str, ancestor: str) -> bool:
    """Whether the dotted module path ``path`` is ``ancestor`` or lies below it (``""``, the root, holds all).

    Example:
        >>> within("layer1.0.conv1", "layer1"), within("layer10.conv", "layer1"), within("fc", "")
        (True, False, True)
    """
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


def names_by_identity(named: Iterable[tuple[str, object]]) -> dict[int, list[str]]:
    """Every name of each object in ``named`` (e.g. ``named_parameters(remove_duplicate=False)``), by ``id``.

    The names keep the order of ``named``, so the first is the one ``named_*()`` gives without duplicates.
    """
    names: dict[int, list[str]] = {}
    for name, obj in named:
        names.setdefault(id(obj), []).append(name)
    return names


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path of each module in ``model`` (``id`` -> paths), the first being the one torch.fx traces it under."""
    return names_by_identity(model.named_modules(remove_duplicate=False))
