"""Where a saved model's architecture comes from: the source :func:`sharify.save` records in the recipe.

A source is a :class:`~sharify.io.zoo.ModelSource` (library, builder name, builder kwargs); with one in
the recipe, ``sharify.load(path)`` rebuilds the architecture without being given a model. It is the
``source=`` passed to :func:`sharify.save`, or detected (:func:`detect_source`): recorded by
:func:`sharify.io.zoo.build_model`, read from a timm model's ``pretrained_cfg``, or, for a torchvision
classification model (which does not know its builder), identified by its structure
(:func:`torchvision_matches`). Every source is checked before it is stored: its builder, run
without weights (meta device), must make the saved model's class with every path and shape of the file.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from .._paths import within
from ..analysis.shapes import patch_embed_size
from ..layers import SHARED_STORE_NAME, SharedStore
from .reapply import conv_path, fit_problems
from .recipe import Recipe, recipe_of
from .zoo import SOURCE_ATTR, ModelSource, build_model, resolve_model_name

__all__ = [
    "build_quietly",
    "build_structure",
    "registered_on_meta",
    "detect_source",
    "resolve_source",
    "source_problem",
    "torchvision_matches",
]

logger = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int, ...]]


def _known_source(model: nn.Module) -> ModelSource | None:
    """The source recorded by :func:`sharify.io.zoo.build_model`, or read from a timm model's ``pretrained_cfg``."""
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
        size, default = patch_embed_size(model), tuple(cfg.get("input_size") or ())[1:]
        if size is not None and size != default:  # a ViT built with img_size=64: its position table's size
            kwargs["img_size"] = list(size)
        tag = cfg.get("tag")  # the pretrained tag selects the rebuilt model's pretrained_cfg (mean/std, input size)
        return ModelSource("timm", f"{cfg['architecture']}.{tag}" if tag else str(cfg["architecture"]), kwargs)
    return None


def detect_source(model: nn.Module) -> ModelSource | None:
    """The model's source: recorded by :func:`sharify.io.zoo.build_model`, read from a timm model, or identified.

    For a timm model it is ``pretrained_cfg["architecture"]`` (with its pretrained tag, which selects
    the data config) and ``num_classes`` and ``in_chans`` (the first conv's input channels); other
    builder kwargs that do not change the state_dict (``global_pool``, drop rates) are not visible
    on the model: pass ``source=`` or build with :func:`sharify.io.zoo.build_model` to record them.
    A torchvision classification model is identified by its structure (:func:`torchvision_matches`);
    ``None`` when no builder, or more than one, makes it.
    """
    known = _known_source(model)
    if known is not None or not _from_torchvision(model):
        return known
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    matches, _ = torchvision_matches(model, recipe_of(model, source=None), shapes)
    return matches[0] if len(matches) == 1 else None


def build_quietly(source: ModelSource, device: str) -> nn.Module:
    """Builds ``source`` without consuming the caller's random numbers."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        model, _ = build_model(source)
    return model


@contextlib.contextmanager
def registered_on_meta() -> Iterator[None]:
    """Moves each parameter and buffer to the meta device as a module registers it, while the builder's other
    tensors stay on the CPU: for builders that compute with tensor values (torchvision's RegNet turns its widths
    into lists), which ``torch.device("meta")`` cannot run. Uses torch's module registration hooks (global while
    the block runs, removed afterwards)."""

    def parameter(module: nn.Module, name: str, p: nn.Parameter | None) -> nn.Parameter | None:
        if p is None or type(p) is not nn.Parameter:
            return p
        return nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    def buffer(module: nn.Module, name: str, b: Tensor | None) -> Tensor | None:
        return None if b is None else b.to("meta")

    # Documented as "may return a modified value"; the stubs say the hooks return None.
    handles = [
        nn.modules.module.register_module_parameter_registration_hook(parameter),  # type: ignore[arg-type]
        nn.modules.module.register_module_buffer_registration_hook(buffer),  # type: ignore[arg-type]
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_structure(source: ModelSource) -> nn.Module:
    """Builds ``source`` without weights (every tensor on the meta device): cheap, no memory, no init.

    The caller's random numbers are not consumed and the builder's warnings are silenced.

    Raises:
        Exception: Whatever the builder raises.
    """
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. GoogLeNet's FutureWarning about its default init
        try:
            with torch.device("meta"):
                return build_model(source)[0]
        except (RuntimeError, NotImplementedError):  # a builder that computes with tensor values
            with registered_on_meta():
                return build_model(source)[0]


@functools.lru_cache(maxsize=32)
def _torchvision_structure(name: str, num_classes: int) -> nn.Module:
    """torchvision's ``name`` built by :func:`build_structure`; cached (only read), as saves repeat."""
    return build_structure(ModelSource("torchvision", name, {"num_classes": num_classes}))


def source_problem(source: ModelSource, recipe: Recipe, shapes: Shapes) -> str | None:
    """Why ``source`` does not rebuild the saved architecture (class, paths, shapes), or ``None`` when it does."""
    try:
        json.dumps(asdict(source))
    except TypeError as exc:
        return f"its builder kwargs cannot be stored as JSON ({exc})"
    try:
        try:
            built = build_structure(source)
        except (RuntimeError, NotImplementedError):  # a builder that reads tensor values
            built = build_quietly(source, "cpu")
    except Exception as exc:  # any builder error means: cannot rebuild from this source
        return f"building it fails ({type(exc).__name__}: {exc})"
    cls = f"{type(built).__module__}.{type(built).__qualname__}"
    if cls != recipe.model_class:
        return f"it builds a {cls}, not a {recipe.model_class}"
    problems = fit_problems(built, recipe, shapes, here="the model it builds", there="the model to save")
    return problems[0] if problems else None


def _from_torchvision(model: nn.Module) -> bool:
    """Whether ``model``'s class is, or derives from, a torchvision model class."""
    return any(c.__module__.startswith("torchvision.models.") for c in type(model).__mro__)


def _under(path: str, prefixes: set[str]) -> bool:
    return any(within(path, p) for p in prefixes)


def _stores(model: nn.Module) -> set[str]:
    """Paths of the model's stores of shared tensors, at any depth (a submodule may be sharified on its own)."""
    return {SHARED_STORE_NAME} | {p for p, m in model.named_modules() if isinstance(m, SharedStore)}


def _num_outputs(model: nn.Module) -> int | None:
    """Outputs of the last ``Linear``/``Conv2d`` outside the shared stores: a classification model's ``num_classes``."""
    last = None
    stores = _stores(model)
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and not _under(path, stores):
            last = m.out_features
        elif isinstance(m, nn.Conv2d) and not _under(path, stores):
            last = m.out_channels
    return last


def _settings(module: nn.Module) -> dict[str, Any]:
    """A module's public plain attributes: its hyperparameters (``stride``, ``eps``, ``p``, ``transform_input``...)."""

    def plain(v: Any) -> bool:
        return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, tuple) and all(map(plain, v)))

    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and plain(v)}


def _module_problems(built: nn.Module, model: nn.Module, recipe: Recipe, here: str, there: str) -> list[str]:
    """How the module trees differ: paths, classes and hyperparameters (sharify's own changes allowed for)."""
    replaced = {conv_path(g, m) for g in recipe.groups if g.method == "basis" for m in g.members}  # BasisConv2d
    mine = {p: m for p, m in model.named_modules() if not _under(p, _stores(model) | replaced)}
    problems = []
    for path, ref in built.named_modules():
        if _under(path, replaced):  # a filter-basis block in its place: fit_problems checks its geometry
            continue
        have = mine.pop(path, None)
        where = f"`{path}`" if path else "the model itself"
        if have is None:
            problems.append(f"{where} ({type(ref).__name__}) is in {here} but not in {there}")
            continue
        cls = getattr(type(have), "_sharify_base", type(have))  # a member conv computes as its original class
        if cls is not type(ref):
            problems.append(f"{where} is {type(ref).__name__} in {here} but {cls.__name__} in {there}")
            continue
        want, got = _settings(ref), _settings(have)  # attributes the builder does not set are the user's own
        key = next((k for k in sorted(want) if k not in got or got[k] != want[k]), None)
        if key is not None:
            theirs = repr(got[key]) if key in got else "absent"
            problems.append(f"{where} has {key}={want[key]!r} in {here} but {theirs} in {there}")
    return problems + [f"`{p}` ({type(m).__name__}) is in {there} but not in {here}" for p, m in mine.items()]


def torchvision_matches(model: nn.Module, recipe: Recipe, shapes: Shapes) -> tuple[list[ModelSource], str]:
    """The torchvision classification builders that make ``model``'s architecture, found by structure alone.

    Candidates are the builders of ``torchvision.models.list_models(module=torchvision.models)`` defined
    next to the model's class, built on the meta device with the model's ``num_classes`` (the outputs
    of its last ``Linear``/``Conv2d``). One matches when it makes the same class with the same module
    paths, classes and hyperparameters, and every path and shape of the file (``shapes``, keyed as
    the sharified model's state_dict) fits it as :func:`~sharify.io.reapply.fit_problems` checks. The
    weights are not compared: a fine-tuned or channel-aligned model is identified too.

    Returns:
        The matching sources (``num_classes`` in the kwargs when not the builder's default), and, when
        none matches, why not (the closest candidate's first difference), in words.
    """
    import torchvision

    cls = type(model)
    n = _num_outputs(model)
    names = [
        name
        for name in torchvision.models.list_models(module=torchvision.models)
        if torchvision.models.get_model_builder(name).__module__ == cls.__module__
    ]
    if not names or n is None:
        return [], f"no torchvision classification builder makes a {cls.__module__}.{cls.__qualname__}"
    try:
        default = inspect.signature(cls).parameters["num_classes"].default
    except (KeyError, TypeError, ValueError):
        default = None
    kwargs = {} if default == n else {"num_classes": n}
    matches, misses = [], []
    for name in names:
        try:
            built = _torchvision_structure(name, n)
        except Exception as exc:  # a builder that cannot run without weights: not a candidate
            logger.debug("torchvision:%s cannot be built on the meta device (%s)", name, exc)
            continue
        if type(built) is not cls:
            continue
        here = f"torchvision's {name}"
        problems = _module_problems(built, model, recipe, here, "the model") or fit_problems(
            built, recipe, shapes, here=here, there="the model"
        )
        if problems:
            misses.append((len(problems), name, problems[0]))
        else:
            matches.append(ModelSource("torchvision", name, kwargs))
    if matches or not misses:
        return matches, f"no torchvision classification builder makes a {cls.__qualname__}"
    _, name, first = min(misses)
    return [], f"no torchvision builder of {cls.__qualname__} makes this architecture (closest, {name}: {first})"


def resolve_source(
    model: nn.Module, source: ModelSource | str | None, recipe: Recipe, shapes: Shapes
) -> ModelSource | None:
    """The source :func:`sharify.save` records: ``source`` (checked), else the detected one, else ``None``.

    Warns when a detected source does not rebuild the model, and when a torchvision model cannot be
    identified (``sharify.load(path)`` then needs ``model=``).

    Raises:
        TypeError: ``source`` is neither a name nor a :class:`~sharify.io.zoo.ModelSource`.
        ValueError: An explicit ``source`` does not rebuild the model.
    """
    explicit = source is not None
    if isinstance(source, str):
        source = resolve_model_name(source)
    elif source is not None and not isinstance(source, ModelSource):
        raise TypeError(f"source must be a model name or a sharify.ModelSource, got {type(source).__name__}")
    source = source or _known_source(model)
    if source is None:
        return _identified(model, recipe, shapes)
    problem = source_problem(source, recipe, shapes)
    if problem is None:
        return source
    text = f"{source.library}:{source.name} with {source.kwargs}"
    if explicit:
        raise ValueError(
            f"source={text} does not rebuild this model ({problem}); pass the builder kwargs it was made with, "
            "e.g. source=sharify.ModelSource('torchvision', 'resnet18', {'num_classes': 10})"
        )
    warnings.warn(
        f"the model looks like {text} but that does not rebuild it ({problem}); saving without a source, "
        "so the file loads with sharify.load(path, model=...); pass source= to record one",
        stacklevel=3,
    )
    return None


def _identified(model: nn.Module, recipe: Recipe, shapes: Shapes) -> ModelSource | None:
    """The torchvision builder that makes ``model``, or ``None`` (with a warning for a torchvision model)."""
    name = type(model).__name__
    if not _from_torchvision(model):
        logger.info("no source known for %s; the file loads with sharify.load(path, model=...)", name)
        return None
    matches, reason = torchvision_matches(model, recipe, shapes)
    if len(matches) == 1:
        logger.info("identified %s as torchvision:%s %s", name, matches[0].name, matches[0].kwargs)
        return matches[0]
    if matches:
        reason = f"it matches several torchvision builders ({', '.join(m.name for m in matches)})"
    warnings.warn(
        f"saving {name} without a source: {reason}. sharify.load(path) will need the architecture "
        "(sharify.load(path, model=...)); or record the builder with sharify.save(..., source=...), e.g. "
        "source=sharify.ModelSource('torchvision', 'resnet18', {'num_classes': 10})",
        stacklevel=4,
    )
    return None
