"""One-file save and restore of sharified models: safetensors weights with the recipe in the header.

:func:`save` writes the state_dict (each shared tensor once: the model registers it once) to a
``.safetensors`` file and puts the :class:`~sharify.io.recipe.Recipe` in the file's string metadata
(key ``"sharify"``, JSON): library version, source model (:mod:`sharify.io.source`), sharing options
and groups, and a CRC-32 of every tensor. :func:`load` rebuilds the architecture from the recipe (or takes the user's
own), re-applies the sharing and loads the weights strictly; the result equals the saved model bit
for bit. Any safetensors reader can still load the weights: the recipe is only metadata.

Wrapped models: ``save`` unwraps DDP, DataParallel and ``torch.compile`` wrappers and says so with a
``UserWarning`` (reading is harmless, and the file then loads into the bare model); ``load`` into a
wrapped model is refused, as :func:`sharify.sharify` refuses it: load into the bare model, then wrap
the result.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._version import __version__
from .._wrappers import is_wrapper, unwrap
from ..errors import CheckpointError, TieError, UnsupportedModelError
from ..layers import shared_groups, shared_stores
from ..rewrite.verify import verify
from .aliases import expand, find_aliases, retie_aliases, untied_problems
from .atomic import atomic_write
from .reapply import apply_recipe, check_fits, check_same_groups, raise_mismatch, shape_mismatches
from .recipe import Recipe, recipe_of
from .source import build_quietly, resolve_source
from .unshared import load_state, meta_gap
from .zoo import ModelSource

__all__ = ["RECIPE_KEY", "load", "read_recipe", "save"]

logger = logging.getLogger(__name__)

#: Metadata key of the recipe in the safetensors header.
RECIPE_KEY = "sharify"
_RESERVED = ("format", RECIPE_KEY)

PathLike = str | os.PathLike[str]


def _checksum(tensor: Tensor) -> str:
    data = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return f"{zlib.crc32(data.data):08x}"


def _as_path(path: object, function: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{function} expects a file path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def _check_destination(path: Path) -> None:
    """Refuses, before anything is written, a ``save`` destination that cannot become a file."""
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"is a directory; pass a file path such as {path / 'model.safetensors'}", str(path)
        )
    if path.exists() and not path.is_file():
        raise FileExistsError(
            errno.EEXIST,
            "exists and is not a regular file (save replaces the file at path); pass another path",
            str(path),
        )
    parent = path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a directory; pass another path", str(path))
    if existing != parent:
        raise FileNotFoundError(
            errno.ENOENT, f"the directory {parent} does not exist; create it first (os.makedirs)", str(path)
        )


def _check_source_file(path: Path) -> None:
    """Refuses a ``load`` / ``read_recipe`` path that is not a file, saying what it is."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise IsADirectoryError(
            errno.EISDIR, f"is a directory, not a file; pass the .safetensors file{hint}", str(path)
        )
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))


def _format_hint(path: Path) -> str:
    """What a file that safetensors cannot read is, and how to read it."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        head = b"?"
    if not head:
        return "it is empty (0 bytes): it was not written completely; save the model again with sharify.save"
    # A safetensors file starts with its header's length (8 bytes, little-endian; the first may be 0x80) and the
    # header's "{"; torch.save writes a zip archive, or a legacy pickle (0x80, then the protocol 2-5).
    safetensors = head[8:9] == b"{"
    pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not safetensors and (head.startswith(b"PK\x03\x04") or pickle):
        return (
            "it is a torch.save file (a pickle), not a safetensors file: load an original (unshared) checkpoint with "
            "sharify.load_unshared_state_dict(shared, torch.load(path, weights_only=True)), a sharified model's "
            "state_dict with model.load_state_dict(torch.load(path, weights_only=True))"
        )
    return "it is truncated, corrupted or of another format: save the model again with sharify.save"


def save(
    model: nn.Module,
    path: PathLike,
    *,
    source: ModelSource | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Saves a (sharified) model to one ``.safetensors`` file with the recipe to rebuild it.

    The weights are the model's state_dict (each shared tensor once); the header's metadata holds the
    recipe (see :class:`~sharify.io.recipe.Recipe`). The file is written to a temporary file next to
    ``path`` and renamed, so ``path`` is never left half-written. A DDP, DataParallel or
    ``torch.compile`` wrapper is unwrapped with a ``UserWarning``: the file holds the bare model's keys.

    Args:
        model: The model, usually returned by :func:`sharify.sharify` or :func:`load`. An unshared
            model is saved too (its recipe then has no groups).
        path: Destination file.
        source: Where to rebuild the architecture from: a name (``"resnet18"``, ``"timm:resnet26"``)
            or a :class:`~sharify.io.zoo.ModelSource` with builder kwargs. Default: recorded by
            :func:`sharify.io.zoo.build_model`, read from a timm model's ``pretrained_cfg``, or, for a
            torchvision classification model, the one builder that makes its structure (with its
            ``num_classes``; see :func:`sharify.io.source.torchvision_matches`). A torchvision model no
            builder (or several) makes is saved with a ``UserWarning`` and no source: such a file,
            like one of a user-defined model, loads with ``load(path, model=...)``. Any source is
            checked by building the architecture on the meta device.
        metadata: Extra string entries for the header (``"format"`` and ``"sharify"`` are reserved);
            read them back with :func:`read_recipe`.

    Returns:
        The path written.

    Raises:
        TypeError: ``model`` is not a module, ``path`` not a str/``os.PathLike``, ``metadata`` not a mapping.
        OSError: ``path`` cannot be written, checked before anything is built: a directory
            (``IsADirectoryError``), a missing directory (``FileNotFoundError``), a file where a directory
            should be (``NotADirectoryError``), an existing special file (``FileExistsError``), or a failed
            write (e.g. ``PermissionError``); the error's ``filename`` is ``path``, never the temporary file.
        TieError: The model's sharing is broken (see :func:`sharify.verify`); call :func:`sharify.retie`.
        ValueError: An explicit ``source`` does not rebuild the model; a tensor is on the meta device;
            a shared group has no member left.

    Example:
        >>> import tempfile, torchvision, sharify
        >>> shared = sharify.sharify(torchvision.models.resnet18())
        >>> path = sharify.save(shared, tempfile.mkdtemp() + "/r18.safetensors")  # found: torchvision's resnet18
        >>> restored = sharify.load(path)
        >>> sorted(sharify.shared_groups(restored)) == sorted(sharify.shared_groups(shared))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(model).__name__}")
    path = _as_path(path, "save")
    _check_destination(path)
    bare = _savable(model)
    extra = _extra_metadata(metadata)
    tensors, shapes, aliases = _tensors_to_store(bare.state_dict())
    recipe = recipe_of(bare, source=None, aliases=aliases)
    recipe = replace(
        recipe,
        source=resolve_source(bare, source, recipe, shapes),  # called here: its warnings point at save's caller
        checksums={k: _checksum(v) for k, v in tensors.items()},
    )
    header = {"format": "pt", RECIPE_KEY: _recipe_text(recipe), **extra}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    logger.info("saved %s (%d tensors, %d groups) to %s", type(bare).__name__, len(tensors), len(recipe.groups), path)
    return path


def _savable(model: nn.Module) -> nn.Module:
    """The bare model inside any wrapper (warning that it was unwrapped), if its ties are intact and it is eager.

    Raises:
        UnsupportedModelError: A TorchScript module.
        TieError: The model's sharing is broken.
    """
    bare, wrappers = unwrap(model)
    if wrappers:
        warnings.warn(
            f"sharify.save got a model wrapped in {' > '.join(wrappers)}; saved the bare {type(bare).__name__} inside "
            "(keys without the wrapper's prefix), which loads with sharify.load into an unwrapped model; "
            "pass the bare model (e.g. ddp.module, compiled._orig_mod) to save without this warning",
            UserWarning,
            stacklevel=3,  # save's caller
        )
    if isinstance(bare, torch.jit.ScriptModule):
        raise UnsupportedModelError("got a TorchScript module; save the eager model (before torch.jit.script)")
    problems = verify(bare)
    if problems:
        raise TieError(f"cannot save {type(bare).__name__}: {problems[0]}; call sharify.retie(model) first")
    return bare


def _extra_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's header entries, checked: a mapping of str to str without sharify's reserved keys."""
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
    extra = dict(metadata or {})
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str; got {k!r}: {type(v).__name__}")
        if k in _RESERVED:
            raise ValueError(f"metadata key {k!r} is reserved by sharify; use another name")
    return extra


def _tensors_to_store(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]], dict[str, str]]:
    """``(tensors, shapes, aliases)``: what the file stores of a state_dict (detached, on the CPU, contiguous;
    the model's own ties once, views of one buffer as copies), every entry's shape, and the ties
    (:func:`~sharify.io.aliases.find_aliases`) that load restores.

    Raises:
        ValueError: An entry is no tensor or is on the meta device.
    """
    aliases, overlapping = find_aliases(state)  # the model's own ties: stored once, re-tied by load
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state_dict entry `{key}` is a {type(value).__name__}; safetensors stores tensors only")
        if value.is_meta:
            raise ValueError(
                f"`{key}` is on the meta device (it has no data); materialise the model first "
                "(model.to_empty(device=...) and load its weights)"
            )
        tensors[key] = value.detach().to("cpu").contiguous()
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for key in aliases:
        del tensors[key]
    for key in overlapping:  # views of one buffer: stored as copies (loading copies into the model's own views)
        tensors[key] = tensors[key].clone()
    return tensors, shapes, aliases


def _recipe_text(recipe: Recipe) -> str:
    """The recipe as the header stores it (JSON), if :func:`load` can rebuild the model from it.

    Raises:
        ValueError: A shared group has no member left; the options are not JSON.
    """
    empty = next((g for g in recipe.groups if not g.members), None)
    if empty is not None:
        raise ValueError(
            f"shared group `{empty.key}` has no member convs left (all were un-shared, e.g. by conv-BN fusion), so "
            f"load could not rebuild it; delete `model.{empty.holder_prefix[:-1]}` or save before un-sharing"
        )
    try:
        return recipe.to_json()
    except TypeError as exc:
        raise ValueError(f"the sharing options {recipe.options} cannot be stored as JSON ({exc})") from exc


def _read_header(path: Path) -> tuple[Recipe, dict[str, tuple[int, ...]]]:
    _check_source_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError for every malformed file
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); {_format_hint(path)}") from exc
    if RECIPE_KEY not in meta:
        raise CheckpointError(
            f"{path} is a safetensors file without a sharify recipe, so it was not written by sharify.save. "
            "Load a plain state_dict with model.load_state_dict(safetensors.torch.load_file(path)), or an "
            "original (unshared) checkpoint with "
            "sharify.load_unshared_state_dict(shared, safetensors.torch.load_file(path))"
        )
    try:
        recipe = Recipe.from_json(meta[RECIPE_KEY], {k: v for k, v in meta.items() if k not in _RESERVED})
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} has a damaged sharify recipe ({type(exc).__name__}: {exc})") from exc
    return recipe, shapes


def read_recipe(path: PathLike) -> Recipe:
    """Reads the recipe (and the user's metadata) of a file written by :func:`save`, without the weights.

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        FileNotFoundError: No such file (``IsADirectoryError``: ``path`` is a directory).
        CheckpointError: Not a readable safetensors file (empty, truncated, a ``torch.save`` pickle: the
            message says which and what to do), or not one written by :func:`save`.

    Example:
        >>> import tempfile, torchvision, sharify
        >>> path = sharify.save(sharify.sharify(torchvision.models.resnet18()), tempfile.mkdtemp() + "/m.safetensors",
        ...                     source="resnet18", metadata={"epoch": "3"})
        >>> recipe = sharify.read_recipe(path)
        >>> recipe.source.name, [g.key for g in recipe.groups][:2], recipe.metadata
        ('resnet18', ['layer1.conv2', 'layer2.conv2'], {'epoch': '3'})
    """
    return _read_header(_as_path(path, "read_recipe"))[0]


def _warn_version(recipe: Recipe, path: Path) -> None:
    if recipe.version != __version__:
        warnings.warn(
            f"{path} was written by sharify {recipe.version or '(unknown)'}, this is sharify {__version__}: the "
            "recipe is re-applied with this version's rules and checked against the file; if loading fails, "
            f"load it with sharify=={recipe.version}",
            stacklevel=3,
        )


def _load_tensors(path: Path, recipe: Recipe) -> dict[str, Tensor]:
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); it is truncated or corrupted") from exc
    for key, want in recipe.checksums.items():
        if key not in tensors:
            raise CheckpointError(f"{path} is damaged: tensor `{key}` listed in its recipe is missing")
        if _checksum(tensors[key]) != want:
            raise CheckpointError(
                f"{path} is corrupted: tensor `{key}` does not match the checksum written with it; "
                "copy the file again or save the model again"
            )
    return tensors


def _load_weights(target: nn.Module, tensors: dict[str, Tensor], strict: bool, path: Path) -> None:
    """``load_state_dict``; a model built on the meta device is materialised with the file's tensors."""
    empty = meta_gap(target, tensors)
    if empty is not None:
        raise CheckpointError(
            f"the model was built on the meta device and {path} has no data for `{empty}`, which would stay without "
            "data; build the model on the CPU"
        )
    load_state(target, tensors, strict=strict)


def load(path: PathLike, model: nn.Module | None = None, *, strict: bool = True) -> nn.Module:
    """Restores a model saved by :func:`save`: architecture, sharing and weights.

    With ``model=None`` the architecture is rebuilt from the recipe's source (timm/torchvision, random
    init, no download; the caller's random number stream is not consumed), sharified as recorded and
    loaded. With a ``model`` (the original, unshared architecture, or one already sharified the same
    way) the recorded sharing is applied to a copy of it after checking that every member path and
    every tensor shape matches the file. The weights are then loaded; every tensor is checked
    against its checksum. The result equals the saved model bit for bit (with ``model=None`` in the
    file's floating dtype; with a ``model``, converted to the model's dtype as ``load_state_dict`` does).

    Args:
        path: A file written by :func:`save`.
        model: The architecture to load into; not modified (a sharified copy is returned). A model
            built on the meta device is materialised on the CPU with the file's tensors (in the model's
            dtypes).
        strict: As in ``nn.Module.load_state_dict``: with ``False``, keys outside the sharing groups
            that only one side has are skipped. The sharing groups must always match.

    Returns:
        The sharified model with the saved weights, in training mode as built (call ``.eval()``).

    Raises:
        TypeError: ``path`` is not a str/``os.PathLike``, ``model`` not a module, ``strict`` not a bool.
        FileNotFoundError: No such file (``IsADirectoryError``: ``path`` is a directory).
        CheckpointError: The file is empty, truncated, corrupted, a ``torch.save`` pickle or not written
            by :func:`save`; or ``model=None`` and the recipe records no source; or ``model`` is on the
            meta device and the file lacks one of its tensors.
        RecipeMismatchError: The file does not fit ``model``; the message names the first path.
        UnsupportedModelError: ``model`` is wrapped (DDP, DataParallel, ``torch.compile``): load
            into the bare model, then wrap the result.

    Example:
        >>> import tempfile, torch, timm, sharify
        >>> shared = sharify.sharify(timm.create_model("resnet18", num_classes=10))
        >>> path = sharify.save(shared, tempfile.mkdtemp() + "/r18.safetensors")
        >>> restored = sharify.load(path)
        >>> all(torch.equal(a, b) for a, b in zip(shared.state_dict().values(), restored.state_dict().values()))
        True
    """
    path = _as_path(path, "load")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    name = str(path)
    recipe, shapes = _read_header(path)
    try:
        shapes = expand(shapes, recipe.aliases, "the file")
    except KeyError as exc:
        raise CheckpointError(f"{path} has a damaged sharify recipe: {exc.args[0]}") from exc
    _warn_version(recipe, path)
    if model is None:
        if recipe.source is None:
            raise CheckpointError(
                f"{path} records no source model to rebuild ({recipe.model_class or 'unknown class'}); pass the "
                "architecture: sharify.load(path, model=MyModel(...))"
            )
        with torch.random.fork_rng(devices=[]):
            base = build_quietly(recipe.source, "cpu")
            check_fits(base, recipe, shapes, name=name, strict=strict)
            target = apply_recipe(base, recipe, name=name)
    else:
        if not isinstance(model, nn.Module):
            hint = f" (a class: pass an instance, model={model.__name__}(...))" if isinstance(model, type) else ""
            raise TypeError(f"load expects model=None or a torch.nn.Module, got {type(model).__name__}{hint}")
        if is_wrapper(model):
            raise UnsupportedModelError(
                f"got a {type(model).__name__} wrapper; load into the bare model and wrap the result "
                "(shared = sharify.load(path, model); DDP(shared) / torch.compile(shared))"
            )
        if shared_groups(model) or shared_stores(model):
            check_same_groups(model, recipe, name=name)
            target = copy.deepcopy(model)
        else:
            check_fits(model, recipe, shapes, name=name, strict=strict)
            with torch.random.fork_rng(devices=[]):  # init="random" in the recipe draws numbers
                target = apply_recipe(model, recipe, name=name)
    retie_aliases(target, recipe.aliases, name=name)
    built = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    raise_mismatch(name, shape_mismatches(built, shapes, strict), recipe)
    raise_mismatch(name, untied_problems(target, recipe.aliases, set(shapes), "the file"), recipe)
    tensors = expand(_load_tensors(path, recipe), recipe.aliases, "the file")
    if model is None:
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            target.to(dtypes.pop())  # keep the file's precision when the saved model was e.g. bf16
    _load_weights(target, tensors, strict, path)
    problems = verify(target)
    if problems:  # pragma: no cover - apply_recipe builds consistent ties
        raise TieError(f"loading {path} produced broken sharing: {problems[0]}")
    return target
