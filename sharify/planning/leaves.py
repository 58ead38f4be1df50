"""The ``leaf_modules=`` argument of :func:`sharify.plan` / :func:`sharify.sharify`: module classes or paths that
torch.fx must not trace into, checked against the model before the analysis runs."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from torch import nn

from .._paths import module_paths

__all__ = ["resolve_leaf_modules"]


def _got(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def resolve_leaf_modules(model: nn.Module, leaf_modules: object) -> tuple[type[nn.Module] | str, ...]:
    """Checks a ``leaf_modules=`` spec against ``model`` and returns it as a tuple.

    A bare string is one module path and a bare class one class (never iterated); every path must name a
    submodule of ``model`` (an alias path becomes the module's first path, the one torch.fx traces it under).

    Raises:
        TypeError: An entry that is neither an ``nn.Module`` class nor a path (a module instance, a class that
            is not a module, ...), or a spec that is not a list/tuple/set of them.
        ValueError: A path that names no submodule (with the closest paths that do) or the root.
    """
    if leaf_modules is None:
        return ()
    if isinstance(leaf_modules, (str, type, nn.Module)):
        leaf_modules = (leaf_modules,)  # one path or class (a module instance gets its own error below)
    if isinstance(leaf_modules, (Mapping, bytes)) or not isinstance(leaf_modules, Iterable):
        raise TypeError(
            f"leaf_modules must be a module path, a module class or a list of them, got {_got(leaf_modules)}"
        )
    spec = tuple(leaf_modules)
    paths = [p for p, _ in model.named_modules(remove_duplicate=False) if p]
    aliases = module_paths(model)
    out: list[type[nn.Module] | str] = []
    for x in spec:
        if isinstance(x, str):
            if x not in paths:
                close = difflib.get_close_matches(x, paths, n=3)
                hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "see model.named_modules()"
                what = "the root (the model itself)" if not x else f"no submodule of {type(model).__name__}"
                raise ValueError(f"leaf_modules names {x!r}, which is {what}; {hint}")
        elif isinstance(x, nn.Module):
            raise TypeError(
                f"leaf_modules takes module classes or paths, got a {type(x).__name__} instance; pass its path or "
                f"its class ({type(x).__name__})"
            )
        elif not (isinstance(x, type) and issubclass(x, nn.Module)):
            raise TypeError(f"leaf_modules takes nn.Module classes or module paths (str), got {_got(x)}")
        # A module registered under several paths is traced under its first one.
        out.append(aliases[id(model.get_submodule(x))][0] if isinstance(x, str) else x)
    return tuple(out)
