"""State_dict entries a model ties itself: found for :func:`sharify.save`, restored by :func:`sharify.load`.

Model code ties tensors on its own: one conv module used by several blocks (its weight appears under
every path that reaches it) or ``b.conv.weight = a.conv.weight``. ``state_dict()`` then lists one
tensor under several keys and safetensors refuses to write it ("Some tensors share memory"). The
file stores each such tensor once, under its first key, and the recipe maps the other keys to it
(:attr:`sharify.io.recipe.Recipe.aliases`); loading points the other keys' parameters (or buffers) at
the first key's, so the loaded model has the original's ties. These ties are the model's own: they
are not sharify's sharing groups, and :func:`sharify.verify` does not report them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from torch import Tensor, nn

from ..errors import RecipeMismatchError

__all__ = ["expand", "find_aliases", "retie_aliases", "untied_problems"]

V = TypeVar("V")


def _identity(t: Tensor) -> tuple[object, ...] | None:
    if t.is_meta or t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def find_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, str], list[str]]:
    """Entries that are another entry's tensor, and entries that only overlap another's memory.

    Returns:
        ``(aliases, overlapping)``: ``aliases`` maps each key whose tensor is exactly (same memory,
        shape, strides and dtype) that of an earlier key to that key; ``overlapping`` lists the keys
        whose memory another entry shares without being the same tensor (views of one buffer), which
        must be stored as copies.
    """
    first: dict[tuple[object, ...], str] = {}
    storages: dict[tuple[object, ...], list[str]] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        ident = _identity(t)
        if ident is None:
            continue
        if ident in first:
            aliases[key] = first[ident]
            continue
        first[ident] = key
        storages.setdefault(ident[:2], []).append(key)
    overlapping = [k for keys in storages.values() if len(keys) > 1 for k in keys[1:]]
    return aliases, overlapping


def expand(values: Mapping[str, V], aliases: Mapping[str, str], what: str) -> dict[str, V]:
    """``values`` (by stored key) with every alias added, mapped to its stored key's value.

    Raises:
        KeyError: An alias points at a key ``values`` does not have (the message says ``what`` lacks it).
    """
    out = dict(values)
    for alias, key in aliases.items():
        if key not in values:
            raise KeyError(f"`{alias}` is recorded as the same tensor as `{key}`, which {what} does not have")
        out[alias] = values[key]
    return out


def _slot(model: nn.Module, key: str) -> tuple[nn.Module, str, dict[str, Tensor | None]] | None:
    path, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    for table in (module._parameters, module._buffers):
        if name in table:
            return module, name, table  # type: ignore[return-value]
    return None


def retie_aliases(model: nn.Module, aliases: Mapping[str, str], *, name: str) -> None:
    """Points each alias's parameter (or buffer) of ``model`` at the one of the key it aliases.

    Keys ``model`` lacks are skipped (the state_dict comparison names them).

    Raises:
        RecipeMismatchError: An alias and its key are not both parameters (or both buffers) of one shape.
    """
    for alias, key in aliases.items():
        mine, theirs = _slot(model, alias), _slot(model, key)
        if mine is None or theirs is None:
            continue
        value = theirs[2][theirs[1]]
        current = mine[2][mine[1]]
        if current is value:
            continue
        if (mine[2] is mine[0]._parameters) != (theirs[2] is theirs[0]._parameters):
            raise RecipeMismatchError(
                f"{name} ties `{alias}` to `{key}`, but in the model one is a parameter and the other a buffer"
            )
        if value is None or current is None or current.shape != value.shape:
            raise RecipeMismatchError(f"{name} ties `{alias}` to `{key}`, which have different shapes in the model")
        mine[2][mine[1]] = value


def untied_problems(model: nn.Module, aliases: Mapping[str, str], file_keys: set[str], there: str) -> list[str]:
    """Entries ``model`` ties to each other that the file (keys ``file_keys``, ties ``aliases``) stores apart."""
    mine, _ = find_aliases(model.state_dict())
    root = {k: aliases.get(k, k) for k in file_keys}
    return [
        f"`{alias}` and `{key}` are one tensor in the model but two in {there}; load into the architecture the "
        "file was saved from (or untie them: model.<path> = nn.Parameter(tensor.clone()))"
        for alias, key in mine.items()
        if alias in file_keys and key in file_keys and root[alias] != root[key]
    ]
