"""One model of the coverage sweep, end to end: build, plan, sharify, check arithmetic, real forward/backward.

:func:`check_model` builds a model of one of the sweep's sources (:mod:`benchmarks.coverage_sources`:
torchvision and timm classification, torchvision detection/segmentation/video/optical flow, ``transformers``
image classification; random init, no download) on the **meta device**, so even giant models need no memory,
and runs :func:`sharify.plan` and :func:`sharify.sharify` on it with no extra arguments, as a user would
(the analysis runs on fake tensors). The outcome is

* ``shared``: the plan has groups, and ``sharify.report(model, shared).params_after == plan.params_after``;
* ``nothing-to-share``: the library refused the model with a :class:`sharify.SharifyError` (an empty plan
  makes :func:`sharify.sharify` raise :class:`sharify.NothingToShareError`); its message is the reason;
* ``skipped``: the model needs a package that is not installed (the reason names it); nothing was analysed;
* ``error``: anything else (an unexpected exception, arithmetic that does not add up, a sharified model
  whose forward fails or changes the output shape, shared weights without gradients, meta and real
  analyses that disagree): a bug to fix.

For shared models with at most ``forward_max_params`` parameters the real check builds the model on the
CPU, sharifies it (which also confirms the meta-device analysis found the same groups), runs the original
and the sharified model on a small input (``input_px``, respecting timm's fixed/minimum input sizes; the
plan's own input shapes when the small one does not fit; detectors get two images and one target box each
and are run in training mode, which returns their losses) and back-propagates through the sharified one.
Refused models get no real check: sharify changes nothing in them, so there is no sharified model to run.

A second pass, the *MiniViT pass*, does the same with ``preset="minivit"`` (every ``nn.Linear`` of the
attention and MLP branches of transformer and MLP blocks, shared by runs of two consecutive blocks) and records
its outcome in the ``minivit_*`` fields: the same four outcomes (``""`` when the model could not be built),
the groups and parameters after, and, for a model it shares, the same real check (``minivit_real_check``). An
``error`` in either pass is a bug to fix.
"""

from __future__ import annotations

import re
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

import sharify
from benchmarks.coverage_sources import MissingPackageError, build, detection_targets, family_of, library_of
from sharify.io.source import registered_on_meta
from sharify.layers import shared_groups
from sharify.planning.rules import ConvSignature, is_depthwise, is_spatial

__all__ = [
    "LINEAR_ONLY",
    "MINIVIT",
    "NO_RESIDUAL_SEEN",
    "ModelResult",
    "check_model",
    "family_of",
    "new_result",
    "suggested_options",
    "variant_of",
]

OUTCOMES = ("shared", "nothing-to-share", "skipped", "error")

#: The options of the second pass of the sweep (MiniViT's weight sharing of transformer and MLP blocks).
MINIVIT: dict[str, Any] = {"preset": "minivit"}

#: The refusal kind of a model whose residual branches hold nn.Linear layers that only Linear selectors pick.
LINEAR_ONLY = "linear only (try preset='minivit')"

#: The refusal kind "no residual blocks" when parts of the model were not analysed (submodules torch.fx could not
#: trace, or shape propagation that stopped): the model may have residual blocks there.
NO_RESIDUAL_SEEN = "no residual blocks in the analysed parts"


@dataclass
class ModelResult:
    """What the sweep records for one model (one CSV row)."""

    source: str  # see benchmarks.coverage_sources.SOURCES
    library: str
    name: str
    family: str
    variant: str
    outcome: str = "error"
    reason_kind: str = ""  # nothing-to-share: kind of refusal; skipped: "missing package"; error: exception type
    reason: str = ""
    build: str = ""  # how the analysed model got onto the meta device (see _build_meta)
    traced: str = ""  # "yes", "auto-leaf: <paths>", or "no"
    input_shape: str = ""
    blocks: int = 0
    stages: int = 0  # stages of two or more blocks
    groups: int = 0
    members: int = 0
    params_before: int = 0
    params_after: int = 0
    reduction: float = 0.0
    alternative: str = ""  # nothing-to-share with stages: what other options would share (see _alternative)
    misleading_hint: bool = False  # the refusal suggests an option that shares nothing when tried
    repeated_dense_convs: int = 0  # dense spatial convs whose signature another one in the model has too
    convs_without_shape: int = 0  # conv calls shape propagation could not reach (not analysed)
    real_check: str = ""  # "passed", "skipped: ...", or "" when not applicable
    real_input: str = ""
    output_shape: str = ""
    # The MiniViT pass (preset="minivit"): outcome ("" when not run: the model could not be built), reason kind
    # and reason of a refusal or an error, groups, members and parameters after, real check; params_before is
    # the one above.
    minivit_outcome: str = ""
    minivit_reason_kind: str = ""
    minivit_reason: str = ""
    minivit_groups: int = 0
    minivit_members: int = 0
    minivit_params_after: int = 0
    minivit_reduction: float = 0.0
    minivit_real_check: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def variant_of(name: str) -> str:
    """Architecture variant within a family, from the name without sizes: ``resnet50d`` -> ``resnetd``,
    ``seresnext26d_32x4d`` -> ``seresnextd``, ``mobilenetv3_large_100`` -> ``mobilenetv3_large``."""
    base = name.split(".")[0]
    head = re.match(r"^(.*?\d[a-z]*)(?:_|$)", base)  # up to the end of the first token holding a digit
    stem = head.group(1) if head else base
    return re.sub(r"(?<!v)\d+", "", stem).rstrip("_") or base


def new_result(source: str, name: str) -> ModelResult:
    """An empty (``error``) result for model ``name`` of ``source``."""
    return ModelResult(source, library_of(source), name, family_of(source, name), variant_of(name))


def _kind_of(exc: BaseException) -> str:
    message = str(exc)
    if isinstance(exc, sharify.UntraceableError):
        return "untraceable"
    if isinstance(exc, sharify.ExampleInputsError):
        return "input-shapes"
    if isinstance(exc, sharify.NothingToShareError):
        if "has no Conv2d or Linear layers" in message:
            return "no conv or linear layers"
        if message.startswith("no residual blocks"):
            if "could not be traced and were not analysed" in message or "shape propagation stopped" in message:
                return NO_RESIDUAL_SEEN  # parts of the model were not analysed: it may well have some
            return "no residual blocks"
        if "no stage has two" in message:
            return "no multi-block stage"
        if "depthwise=True" in message:
            return "depthwise only"
        if "only pointwise" in message:
            return "pointwise only"
        if "preset='minivit'" in message:  # the branches hold nn.Linear layers, which conv selectors do not pick
            return LINEAR_ONLY
        if "called more than once" in message:
            return "convs reused across blocks"
        return "no same-signature convs"
    return type(exc).__name__


def _timm_input_size(model: nn.Module, target: int) -> tuple[int, int, int] | None:
    """timm's own rule (tests/test_models.py::_get_input_size): fixed sizes are kept, else capped."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict) or cfg.get("input_size") is None:
        return None
    size = tuple(int(x) for x in cfg["input_size"])
    if cfg.get("fixed_input_size"):
        return size  # type: ignore[return-value]
    if max(size) > target:
        minimum = cfg.get("min_input_size")
        size = tuple(int(x) for x in minimum) if minimum else (size[0], *(min(x, target) for x in size[1:]))
    return size  # type: ignore[return-value]


def _leaves(out: Any) -> list[Tensor]:
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, Tensor)]


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(x.shape) for x in _leaves(out)]


def _describe(args: tuple[Any, ...]) -> str:
    if len(args) == 2 and isinstance(args[0], list):  # a detector's (images, targets)
        return f"{len(args[0])} images {'x'.join(map(str, args[0][0].shape))} + targets"
    return ", ".join("x".join(map(str, x.shape)) for x in args)


def _real_inputs(source: str, model: nn.Module, plan: sharify.SharingPlan, input_px: int) -> list[tuple[Any, ...]]:
    """Forward arguments to try, in order: small ones (``input_px``), then the plan's own input shapes."""
    if source == "torchvision-detection":
        images = [torch.rand(3, input_px, input_px) for _ in range(2)]
        return [(images, detection_targets(images, model))]

    def batch(shape: tuple[int, ...], px: int | None) -> Tensor:
        dims = tuple(shape[1:]) if px is None or len(shape) < 4 else (*shape[1:-2], px, px)
        return torch.randn(2, *dims)

    fixed = _timm_input_size(model, input_px) if source == "timm" else None
    small = (torch.randn(2, *fixed),) if fixed else tuple(batch(s, input_px) for s in plan.input_shapes)
    candidates = [small, tuple(batch(s, None) for s in plan.input_shapes)]
    return list({_describe(c): c for c in candidates}.values())


def _real_check(
    source: str, name: str, plan: sharify.SharingPlan, input_px: int, options: dict[str, Any]
) -> tuple[str, str]:
    """Builds the model for real, sharifies it with ``options`` (the groups of ``plan``, made on the meta model,
    are required), runs forward and backward and checks the output shapes and the shared weights' gradients.
    Returns the input and the output shapes, described; raises on any failure."""
    torch.manual_seed(0)
    model = build(source, name)
    shared = sharify.sharify(model, **options)
    got = {key: tuple(members) for key, (_, members) in shared_groups(shared).items()}
    want = {g.key: g.members for g in plan.groups}
    if got != want:
        raise AssertionError(f"analysis of the meta model and of the real model differ: {want} vs {got}")
    params_after = sharify.report(model, shared).params_after
    if params_after != plan.params_after:
        raise AssertionError(f"real model: report params_after {params_after} != plan params_after {plan.params_after}")

    candidates = _real_inputs(source, model, plan, input_px)
    model.train()
    shared.train()
    reference: list[tuple[int, ...]] | None = None
    first_error: Exception | None = None
    for args in candidates:
        if first_error is not None:  # a failed forward may have changed the model (transformers' Swin shrinks
            torch.manual_seed(0)  # its attention windows to a small input's size): the next input gets a new one
            model = build(source, name).train()
        try:
            with torch.no_grad():
                reference = _shapes(model(*args))
            break
        except Exception as exc:  # the input does not suit the original model: try the next one
            first_error = first_error or exc
    if reference is None:
        assert first_error is not None
        tried = "; ".join(_describe(c) for c in candidates)
        raise RuntimeError(f"the original model's forward fails on {tried}: {first_error}") from first_error
    out = shared(*args)
    shapes = _shapes(out)
    if shapes != reference:
        raise AssertionError(f"sharified output shapes {shapes} != original {reference}")
    floats = [y.float().sum() for y in _leaves(out) if y.is_floating_point() and y.requires_grad]
    if not floats:
        raise AssertionError("the sharified model's output has no floating-point tensor with a gradient")
    torch.stack(floats).sum().backward()
    for key, (holder, _) in shared_groups(shared).items():
        grad = holder.weight.grad
        if grad is None or not torch.isfinite(grad).all():
            raise AssertionError(f"shared weight `{key}` got no (finite) gradient")
    return _describe(args), "; ".join("x".join(map(str, s)) for s in shapes)


_SUGGESTIONS: list[tuple[str, dict[str, Any]]] = [
    ("depthwise=True", {"depthwise": True}),
    ("positions=['last']", {"positions": "last"}),
    ("positions='all_spatial'", {"positions": "all_spatial"}),
    ("positions='last'", {"positions": "last"}),
    ("skip_first_block=False", {"skip_first_block": False}),
    ("preset='minivit'", MINIVIT),
    ("positions=('all_linear',)", {"positions": ("all_linear",)}),
]


def suggested_options(reason: str) -> list[dict[str, Any]]:
    """The options a refusal's message suggests trying (``depthwise=True``, ``positions=(2,)``, ...)."""
    out = [options for text, options in _SUGGESTIONS if text in reason]
    out += [{"positions": (int(i),)} for i in re.findall(r"positions=\((-?\d+),\)", reason)]
    return [o for i, o in enumerate(out) if o not in out[:i]]


def _alternative(
    model: nn.Module, plan: sharify.SharingPlan, minivit: sharify.SharingPlan | None = None
) -> tuple[str, bool]:
    """What other options would share: every dense spatial conv position (an audit of the default rule), and
    each option the refusal suggests; and whether one of those suggestions shares nothing (a misleading hint).
    ``minivit``: the model's plan with :data:`MINIVIT`, when already made (not made again)."""
    suggested = suggested_options(plan.empty_reason())
    tries = [{"positions": "all_spatial"}, *(o for o in suggested if o != {"positions": "all_spatial"})]
    out, misleading = [], False
    for options in tries:
        label = ", ".join(f"{k}={v!r}" for k, v in options.items()) + (" (suggested)" if options in suggested else "")
        alt = minivit if options == MINIVIT and minivit is not None else sharify.plan(model, **options)
        out.append(f"{label}: {len(alt.groups)} groups, -{alt.reduction:.1%}" if alt.groups else f"{label}: nothing")
        misleading |= options in suggested and not alt.groups
    return "; ".join(out), misleading


def _repeated_dense_convs(model: nn.Module) -> int:
    """Dense (not depthwise) spatial convs whose signature occurs more than once anywhere in the model: an
    audit of refusals (sharing needs such repeats inside residual stages)."""
    signatures = Counter(
        ConvSignature.of(m)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and is_spatial(m) and not is_depthwise(m)
    )
    return sum(n for n in signatures.values() if n > 1)


def _build_meta(source: str, name: str) -> tuple[nn.Module, str]:
    """The model with every parameter and buffer on the meta device, and how it was built there."""
    try:
        with torch.device("meta"):
            return build(source, name), "meta"
    except MissingPackageError:
        raise
    except Exception:  # a builder that computes with tensors cannot run under the meta device
        with registered_on_meta():
            return build(source, name), "meta (moved at registration)"


def _error(exc: BaseException, stage: str) -> tuple[str, str]:
    """The reason kind and reason of an unexpected exception: its type, and its message with where it was raised."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return type(exc).__name__, f"during {stage}: {exc} [{where}]".replace("\n", " ")[:1000]


def _default_pass(
    result: ModelResult,
    model: nn.Module,
    minivit: sharify.SharingPlan | None,
    forward_max_params: int,
    input_px: int,
) -> None:
    """``sharify.plan(model)`` and ``sharify.sharify(model)`` with no extra arguments (and the real check of a
    shared model): fills the fields of the default options; never raises (a failure is an ``error``)."""
    stage = "plan"
    try:
        try:
            plan = sharify.plan(model)
        except sharify.SharifyError as exc:
            result.traced = "no" if isinstance(exc, sharify.UntraceableError) else "yes"
            result.outcome, result.reason_kind, result.reason = "nothing-to-share", _kind_of(exc), str(exc)
            return
        result.traced = "auto-leaf: " + ", ".join(plan.auto_leaves) if plan.auto_leaves else "yes"
        result.input_shape = "x".join(map(str, plan.input_shapes[0])) if plan.input_shapes else ""
        result.convs_without_shape = plan.convs_without_shape
        result.blocks = len(plan.blocks)
        result.stages = sum(len(s.blocks) > 1 for s in plan.stages)
        result.groups = len(plan.groups)
        result.members = sum(len(g.members) for g in plan.groups)
        result.params_before, result.params_after = plan.params_before, plan.params_after
        result.reduction = plan.reduction
        stage = "sharify"
        try:
            shared = sharify.sharify(model)
        except sharify.NothingToShareError as exc:
            if plan.groups:
                raise
            result.outcome, result.reason_kind, result.reason = "nothing-to-share", _kind_of(exc), str(exc)
            if plan.stages:
                result.alternative, result.misleading_hint = _alternative(model, plan, minivit)
            return
        if not plan.groups:
            raise AssertionError("sharify() returned a model although the plan has no groups")
        stage = "report"
        _check_report(model, shared, plan)
        del shared
        stage = "real check"
        skipped = _too_big(plan, forward_max_params)
        if skipped is None:
            result.real_input, result.output_shape = _real_check(result.source, result.name, plan, input_px, {})
        result.real_check = skipped or "passed"
        result.outcome = "shared"
    except Exception as exc:
        result.outcome = "error"
        result.reason_kind, result.reason = _error(exc, stage)


def _check_report(model: nn.Module, shared: nn.Module, plan: sharify.SharingPlan) -> None:
    """The report of the rewritten model counts what the plan predicted."""
    params_after = sharify.report(model, shared).params_after
    if params_after != plan.params_after:
        raise AssertionError(f"report params_after {params_after} != plan params_after {plan.params_after}")


def _too_big(plan: sharify.SharingPlan, forward_max_params: int) -> str | None:
    """Why the real check is skipped (the model is above ``forward_max_params``), or ``None`` to run it."""
    if plan.params_before <= forward_max_params:
        return None
    return f"skipped: {plan.params_before / 1e6:.0f}M params > {forward_max_params / 1e6:.0f}M"


def _minivit_pass(
    result: ModelResult,
    model: nn.Module,
    planned: sharify.SharingPlan | Exception,
    forward_max_params: int,
    input_px: int,
) -> None:
    """The MiniViT pass: ``planned`` is ``sharify.plan(model, preset="minivit")`` or what it raised; a plan with
    groups is applied to the meta model (:func:`sharify.apply_plan`, not planned again; report arithmetic
    checked) and, up to ``forward_max_params``, checked for real, where the real model is sharified with
    ``sharify.sharify(model, preset="minivit")`` (which must find the same groups). Fills the ``minivit_*``
    fields; never raises."""
    stage = "plan"
    try:
        if isinstance(planned, sharify.SharifyError):
            result.minivit_outcome, result.minivit_reason_kind = "nothing-to-share", _kind_of(planned)
            result.minivit_reason, result.minivit_params_after = str(planned), result.params_before
            return
        if isinstance(planned, Exception):
            raise planned
        plan = planned
        result.minivit_groups = len(plan.groups)
        result.minivit_members = sum(len(g.members) for g in plan.groups)
        result.minivit_params_after, result.minivit_reduction = plan.params_after, plan.reduction
        if not plan.groups:  # sharify() would raise NothingToShareError(plan.empty_reason()): not run again
            refusal = sharify.NothingToShareError(plan.empty_reason())
            result.minivit_outcome, result.minivit_reason_kind = "nothing-to-share", _kind_of(refusal)
            result.minivit_reason = str(refusal)
            return
        stage = "apply_plan"
        shared = sharify.apply_plan(model, plan)
        stage = "report"
        _check_report(model, shared, plan)
        del shared
        stage = "real check"
        skipped = _too_big(plan, forward_max_params)
        if skipped is None:
            _real_check(result.source, result.name, plan, input_px, MINIVIT)
        result.minivit_real_check = skipped or "passed"
        result.minivit_outcome = "shared"
    except Exception as exc:
        result.minivit_outcome = "error"
        result.minivit_reason_kind, result.minivit_reason = _error(exc, f"the MiniViT pass's {stage}")


def check_model(
    source: str, name: str, *, forward_max_params: int = 60_000_000, input_px: int = 128, minivit: bool = True
) -> ModelResult:
    """Runs the coverage check for one model; never raises (failures become ``outcome="error"``, or
    ``minivit_outcome="error"`` in the MiniViT pass).

    Args:
        source: One of :data:`benchmarks.coverage_sources.SOURCES` (``"torchvision"``, ``"timm"``,
            ``"torchvision-detection"``, ``"transformers"``, ...).
        name: Builder name (``transformers``: model type) in that source.
        forward_max_params: Run the real forward/backward check for shared models up to this size.
        input_px: Side of the real check's input (timm models with a fixed input size keep theirs).
        minivit: Also run the MiniViT pass (``preset="minivit"``).
    """
    start = time.perf_counter()
    result = new_result(source, name)
    try:
        try:
            model, result.build = _build_meta(source, name)
        except MissingPackageError as exc:
            result.outcome, result.reason_kind, result.reason = "skipped", "missing package", str(exc)
            return result
        except Exception as exc:
            result.outcome = "error"
            result.reason_kind, result.reason = _error(exc, "build")
            return result
        result.repeated_dense_convs = _repeated_dense_convs(model)
        result.params_before = result.params_after = sum(p.numel() for p in model.parameters())
        planned: sharify.SharingPlan | Exception | None = None
        if minivit:  # planned first: the default pass's audit of a refusal that suggests preset='minivit' reuses it
            try:
                planned = sharify.plan(model, **MINIVIT)
            except Exception as exc:
                planned = exc
        _default_pass(result, model, planned if isinstance(planned, sharify.SharingPlan) else None,
                      forward_max_params, input_px)  # fmt: skip
        if planned is not None:
            _minivit_pass(result, model, planned, forward_max_params, input_px)
    finally:
        result.seconds = round(time.perf_counter() - start, 2)
    return result
