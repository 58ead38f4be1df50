"""Where a saved model's architecture comes from: the source :func:`sharify.save` records in the recipe.

A source is a :class:`~sharify.zoo.ModelSource` (library, builder name, builder kwargs); with one in
the recipe, ``sharify.load(path)`` rebuilds the architecture without being given a model. It is the
``source=`` passed to :func:`sharify.save`, or detected (:func:`detect_source`): recorded by
:func:`sharify.zoo.build_model`, or read from a timm model's ``pretrained_cfg``. Every source is
checked before it is stored: its builder, run on the meta device, must make the saved model's class
with every path and shape of the file.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .reapply import fit_problems
from .recipe import Recipe
from .zoo import SOURCE_ATTR, ModelSource, build_model, resolve_model_name

__all__ = ["build_quietly", "detect_source", "resolve_source", "source_problem"]

logger = logging.getLogger(__name__)


def detect_source(model: nn.Module) -> ModelSource | None:
    """The model's source: recorded by :func:`sharify.zoo.build_model`, or read from a timm model.

    For a timm model it is ``pretrained_cfg["architecture"]`` (with its pretrained tag, which selects
    the data config) and ``num_classes`` and ``in_chans`` (the first conv's input channels); other
    builder kwargs that do not change the state_dict (``global_pool``, drop rates) are not visible
    on the model: pass ``source=`` or build with :func:`sharify.zoo.build_model` to record them.
    A torchvision model does not know its builder's name: pass ``source=`` to :func:`sharify.save`
    or build it with :func:`sharify.zoo.build_model`.
    """
    recorded = getattr(model, SOURCE_ATTR, None)
    if isinstance(recorded, ModelSource):
        return recorded
    cfg = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(cfg, dict) and cfg.get("architecture"):
        kwargs: dict[str, Any] = {}
        if isinstance(getattr(model, "num_classes", None), int):
            kwargs["num_classes"] = model.num_classes
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None:
            kwargs["in_chans"] = first_conv.in_channels
        tag = cfg.get("tag")  # the pretrained tag selects the rebuilt model's pretrained_cfg (mean/std, input size)
        return ModelSource("timm", f"{cfg['architecture']}.{tag}" if tag else str(cfg["architecture"]), kwargs)
    return None


def build_quietly(source: ModelSource, device: str) -> nn.Module:
    """Builds ``source`` without consuming the caller's random numbers."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        model, _ = build_model(source)
    return model


def source_problem(source: ModelSource, recipe: Recipe, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why ``source`` does not rebuild the saved architecture, or ``None`` when it does."""
    try:
        json.dumps(asdict(source))
    except TypeError as exc:
        return f"its builder kwargs cannot be stored as JSON ({exc})"
    try:
        try:
            built = build_quietly(source, "meta")  # cheap: no memory, no init
        except (RuntimeError, NotImplementedError):  # a builder that reads tensor values
            built = build_quietly(source, "cpu")
    except Exception as exc:  # any builder error means: cannot rebuild from this source
        return f"building it fails ({type(exc).__name__}: {exc})"
    cls = f"{type(built).__module__}.{type(built).__qualname__}"
    if cls != recipe.model_class:
        return f"it builds a {cls}, not a {recipe.model_class}"
    problems = fit_problems(built, recipe, shapes, here="the model it builds", there="the model to save")
    return problems[0] if problems else None


def resolve_source(
    model: nn.Module, source: ModelSource | str | None, recipe: Recipe, shapes: Mapping[str, tuple[int, ...]]
) -> ModelSource | None:
    explicit = source is not None
    if isinstance(source, str):
        source = resolve_model_name(source)
    elif source is not None and not isinstance(source, ModelSource):
        raise TypeError(f"source must be a model name or a sharify.zoo.ModelSource, got {type(source).__name__}")
    source = source or detect_source(model)
    if source is None:
        logger.info("no source known for %s; the file loads with sharify.load(path, model=...)", type(model).__name__)
        return None
    problem = source_problem(source, recipe, shapes)
    if problem is None:
        return source
    text = f"{source.library}:{source.name} with {source.kwargs}"
    if explicit:
        raise ValueError(
            f"source={text} does not rebuild this model ({problem}); pass the builder kwargs it was made with, "
            "e.g. source=sharify.zoo.ModelSource('torchvision', 'resnet18', {'num_classes': 10})"
        )
    warnings.warn(
        f"the model looks like {text} but that does not rebuild it ({problem}); saving without a source, "
        "so the file loads with sharify.load(path, model=...); pass source= to record one",
        stacklevel=3,
    )
    return None
