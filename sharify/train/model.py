"""Getting the model to fine-tune: build by name, load original weights, replace the head, sharify.

:func:`prepare_model` is what ``sharify finetune`` does before training: build a timm/torchvision
model (:func:`sharify.io.zoo.build_model`) or take the caller's module, load an *original* (unshared)
checkpoint into it, replace the classifier for the data's classes, then sharify it with the chosen
init (or not, for baselines). Loading the original weights *before* sharifying is equivalent to
:func:`sharify.load_unshared_state_dict` after it, and lets the init see the trained weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._wrappers import strip_wrapper_prefixes
from ..analysis.shapes import patch_embed_size
from ..io.unshared import EMA_KEYS, WEIGHT_KEYS, checkpoint_weights
from ..io.zoo import SOURCE_ATTR, ModelSource, build_model, resolve_model_name, torchvision_names
from ..rewrite.apply import sharify
from .errors import CheckpointError

__all__ = ["PreparedModels", "classifier", "load_weights_file", "prepare_model", "prepare_models", "replace_head"]

logger = logging.getLogger(__name__)


def classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The model's final ``nn.Linear`` and its path (timm ``get_classifier``, ``fc``, ``classifier``, ``head``)."""
    candidates: list[tuple[str, Any]] = []
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()  # type: ignore[operator]
        path = next((p for p, m in model.named_modules() if m is head), None)
        if path is not None:
            candidates.append((path, head))
    for name in ("fc", "classifier", "head", "heads"):
        candidates.append((name, getattr(model, name, None)))
    for path, module in candidates:
        if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
            return f"{path}.{len(module) - 1}", module[-1]
        if isinstance(module, nn.Linear):
            return path, module
        if isinstance(module, nn.Module):
            linears = [(f"{path}.{p}", m) for p, m in module.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    return None


def replace_head(model: nn.Module, num_classes: int) -> bool:
    """Gives ``model`` a freshly initialised classifier with ``num_classes`` outputs (in place).

    Uses timm's ``reset_classifier`` when present, else replaces the final ``nn.Linear`` found by
    :func:`classifier`.

    Returns:
        Whether the classifier was replaced (``False``: it already had ``num_classes`` outputs).

    Raises:
        ValueError: No classifier was found.
    """
    found = classifier(model)
    if found is not None and found[1].out_features == num_classes:
        return False
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)  # type: ignore[operator]
        return True
    if found is None:
        raise ValueError(
            f"cannot find the classifier of {type(model).__name__} to replace it; "
            f"build the model with num_classes={num_classes}"
        )
    path, old = found
    new = nn.Linear(
        old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    model.set_submodule(path, new)
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` that also accepts the ``argparse.Namespace`` timm checkpoints hold."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe_globals is None:
        return torch.load(path, map_location="cpu", weights_only=True)
    with safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _unsafe_globals(path: Path) -> list[str]:
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        found = find(str(path)) if find is not None else []
    except Exception:  # not a zip checkpoint
        return []
    return [g for g in found if g != "argparse.Namespace"]


def load_weights_file(path: str | Path, *, ema: bool = False) -> dict[str, Tensor]:
    """Reads a state_dict from a ``.safetensors`` file, a ``torch.save`` state_dict or a training checkpoint.

    Training checkpoints are dicts that hold the weights under one of :data:`WEIGHT_KEYS`
    (``state_dict`` first: timm's ``CheckpointSaver`` and ``train.py``), next to optimizer state,
    epoch and ``args`` (an ``argparse.Namespace``, which is allowed through ``torch.load``'s
    ``weights_only`` unpickler; nothing else is). ``ema=True`` takes the EMA weights instead
    (:data:`EMA_KEYS`: timm's ``state_dict_ema``). A ``module.``/``_orig_mod.`` prefix is removed.

    Args:
        path: The file.
        ema: Load the checkpoint's EMA weights rather than its ``state_dict``.

    Raises:
        CheckpointError: Missing, unreadable or not a state_dict (one line naming the file and the fix).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the weights file (.safetensors, .pth, .pth.tar)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the --checkpoint path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = _torch_load(path)
    except pickle.UnpicklingError as exc:  # weights_only refused an object type
        unsafe = _unsafe_globals(path)
        what = f"objects of type {', '.join(unsafe)}" if unsafe else "objects other than tensors and plain data"
        raise CheckpointError(
            f"checkpoint {path} holds {what}, which torch.load(weights_only=True) refuses to unpickle; if you trust "
            f"the file, save its weights alone with torch.save(torch.load({str(path)!r}, weights_only=False)"
            f"[{(EMA_KEYS if ema else WEIGHT_KEYS)[0]!r}], 'weights.pth') and pass that file"
        ) from exc
    except Exception as exc:  # corrupt files raise many different types
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {_first_line(exc)}); the file is corrupt or not a "
            "checkpoint: pass a .safetensors, .pth or .pth.tar file of the original model's weights"
        ) from exc
    obj, used = checkpoint_weights(obj, ema=ema)  # also nested: {"model": {"module": {...}}}
    if ema and not set(used) & set(EMA_KEYS):
        raise CheckpointError(
            f"checkpoint {path} holds no EMA weights ({' or '.join(EMA_KEYS)}); drop --checkpoint-ema to load its "
            "state_dict"
        )
    if used:
        logger.info("checkpoint %s: loading its %s", path, "/".join(used))
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} does not hold a state_dict of tensors; save one with torch.save(model.state_dict())"
        )
    return strip_wrapper_prefixes(obj)


def _load_original(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: {detail}; pass the original (unshared) weights "
            "of this --model (a sharified checkpoint is resumed with --resume)"
        ) from None


def prepare_model(
    model: str | ModelSource | nn.Module,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_ema: bool = False,
    share: bool = True,
    sharing: Mapping[str, Any] | None = None,
    input_size: tuple[int, int] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Builds (or takes) a model, loads original weights, fits the head, and sharifies it.

    Args:
        model: A timm/torchvision name (see :func:`sharify.io.zoo.build_model`) or a module (not modified).
        num_classes: Classes of the data; the head is replaced when it has another size.
        in_chans: Input channels for models built by name (timm; ignored with ``checkpoint``).
        pretrained: Load the library's pretrained weights (needs internet on first use).
        checkpoint: File with the original, unshared weights: a state_dict (``.safetensors``/``.pt``/``.pth``)
            or a training checkpoint such as timm's ``.pth.tar`` (its ``state_dict``; see :func:`load_weights_file`).
        checkpoint_ema: Take the checkpoint's EMA weights (timm's ``state_dict_ema``) instead.
        share: Sharify the model (``False`` trains the unshared baseline with the same loop).
        sharing: Keyword arguments for :func:`sharify.sharify` (``init``, ``positions``, ...).
        input_size: ``(H, W)`` of the training images: the analysis's example input when ``sharing``
            has no ``example_inputs`` (its channels are the model's).

    Returns:
        ``(original, model_to_train)``: the unshared model with loaded weights and new head, and its
        sharified copy (the same object when ``share=False``).

    Raises:
        CheckpointError: The checkpoint is missing, corrupt or of another architecture.

    Example:
        >>> original, shared = prepare_model("resnet18", num_classes=10, sharing={"init": "average"})
        >>> sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in original.parameters())
        True
    """
    prepared = prepare_models(
        model,
        num_classes=num_classes,
        in_chans=in_chans,
        pretrained=pretrained,
        checkpoint=checkpoint,
        checkpoint_ema=checkpoint_ema,
        share=share,
        sharing=sharing,
        input_size=input_size,
    )
    return prepared.original, prepared.model


class PreparedModels(NamedTuple):
    """What :func:`prepare_models` returns: :func:`prepare_model`'s pair, and whether the head is new."""

    original: nn.Module
    model: nn.Module
    #: The original's classifier was replaced by a freshly initialised one for ``num_classes`` (the weights
    #: loaded had another head): its outputs are random until trained, so it cannot teach (``--distill``).
    new_head: bool


def prepare_models(
    model: str | ModelSource | nn.Module,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_ema: bool = False,
    share: bool = True,
    sharing: Mapping[str, Any] | None = None,
    input_size: tuple[int, int] | None = None,
) -> PreparedModels:
    """:func:`prepare_model` (same arguments), also saying whether the original's classifier is a new one.

    Raises:
        CheckpointError: The checkpoint is missing, corrupt or of another architecture.
        ValueError: A torchvision model that is not an image classifier.
    """
    state = load_weights_file(checkpoint, ema=checkpoint_ema) if checkpoint is not None else None
    if isinstance(model, nn.Module):
        import copy

        net = copy.deepcopy(model)
    else:
        source = model if isinstance(model, ModelSource) else resolve_model_name(model)
        if source.library == "torchvision" and source.name not in torchvision_names("classification"):
            raise ValueError(
                f"{source.name} is not an image classifier: sharify finetune trains classifiers; sharify it with "
                "the Python API (sharify.sharify) and train it in its own training code"
            )
        if source.library != "timm":
            in_chans = None  # torchvision models take 3 channels; the data is converted instead
        kwargs: dict[str, Any] = {}
        if state is None and not pretrained:
            kwargs["num_classes"] = num_classes
            kwargs["in_chans"] = in_chans
        elif pretrained and in_chans not in (None, 3):
            kwargs["in_chans"] = in_chans  # timm adapts the pretrained stem
        net, _ = build_model(source, pretrained=pretrained, **kwargs)
        if state is not None:  # build with the checkpoint's head so that it loads strictly
            head = classifier(net)
            if head is not None and f"{head[0]}.weight" in state:
                n = state[f"{head[0]}.weight"].shape[0]
                if n != head[1].out_features:
                    net, _ = build_model(source, num_classes=n)
    if state is not None:
        _load_original(net, state, Path(checkpoint))  # type: ignore[arg-type]
    new_head = False
    if num_classes is not None:
        new_head = replace_head(net, num_classes)
        recorded = getattr(net, SOURCE_ATTR, None)
        if isinstance(recorded, ModelSource) and recorded.kwargs.get("num_classes") != num_classes:
            # the model was built with another head (checkpoint's, pretrained): sharify.load rebuilds this one
            kwargs = {**recorded.kwargs, "num_classes": num_classes}
            setattr(net, SOURCE_ATTR, dataclasses.replace(recorded, kwargs=kwargs))
    if not share:
        return PreparedModels(net, net, new_head)
    kwargs = dict(sharing or {})
    if input_size is not None and kwargs.get("example_inputs") is None:
        from .loaders import model_in_chans

        fixed = patch_embed_size(net)  # the size the loaders resize to for a ViT (see build_transforms)
        size = fixed if fixed is not None else input_size
        kwargs["example_inputs"] = torch.zeros(1, model_in_chans(net) or 3, *size)
    shared = sharify(net, **kwargs)
    return PreparedModels(net, shared, new_head)
