"""One model of the coverage sweep, end to end: build, plan, sharify, check arithmetic, real forward/backward.

:func:`check_model` builds a torchvision or timm classification model (random init, no download) on the
**meta device**, so even giant models need no memory, and runs :func:`sharify.plan` and
:func:`sharify.sharify` on it (the analysis runs on fake tensors). The outcome is

* ``shared``: the plan has groups, and ``sharify.report(model, shared).params_after == plan.params_after``;
* ``nothing-to-share``: the library refused the model with a :class:`sharify.SharifyError` (an empty plan
  makes :func:`sharify.sharify` raise :class:`sharify.NothingToShareError`); its message is the reason;
* ``error``: anything else (an unexpected exception, arithmetic that does not add up, a sharified model
  whose forward fails or changes the output shape, shared weights without gradients, meta and real
  analyses that disagree): a bug to fix.

For shared models with at most ``forward_max_params`` parameters the real check builds the model on the
CPU, sharifies it (which also confirms the meta-device analysis found the same groups), runs the original
and the sharified model on a small input (``input_px``, respecting timm's fixed/minimum input sizes) and
back-propagates through the sharified one. Refused models get no real check: sharify changes nothing in
them, so there is no sharified model to run.
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
from sharify.layers import shared_groups
from sharify.rules import ConvSignature, is_depthwise, is_spatial
from sharify.source import registered_on_meta
from sharify.zoo import ModelSource, build_model

__all__ = ["ModelResult", "check_model", "family_of", "suggested_options", "variant_of"]

OUTCOMES = ("shared", "nothing-to-share", "error")


@dataclass
class ModelResult:
    """What the sweep records for one model (one CSV row)."""

    library: str
    name: str
    family: str
    variant: str
    outcome: str = "error"
    reason_kind: str = ""  # nothing-to-share: kind of refusal; error: exception type
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
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def family_of(library: str, name: str) -> str:
    """Model family: the module that defines the builder (``timm.resnet``, ``torchvision.regnet``)."""
    if library == "timm":
        from timm.models import model_entrypoint

        return "timm." + model_entrypoint(name).__module__.removeprefix("timm.models.")
    import torchvision

    return "torchvision." + torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]


def variant_of(name: str) -> str:
    """Architecture variant within a family, from the name without sizes: ``resnet50d`` -> ``resnetd``,
    ``seresnext26d_32x4d`` -> ``seresnextd``, ``mobilenetv3_large_100`` -> ``mobilenetv3_large``."""
    base = name.split(".")[0]
    head = re.match(r"^(.*?\d[a-z]*)(?:_|$)", base)  # up to the end of the first token holding a digit
    stem = head.group(1) if head else base
    return re.sub(r"(?<!v)\d+", "", stem).rstrip("_") or base


def _kind_of(exc: BaseException) -> str:
    message = str(exc)
    if isinstance(exc, sharify.UntraceableError):
        return "untraceable"
    if isinstance(exc, sharify.ExampleInputsError):
        return "input-shapes"
    if isinstance(exc, sharify.NothingToShareError):
        if "has no Conv2d layers" in message:
            return "no conv layers"
        if message.startswith("no residual blocks"):
            return "no residual blocks"
        if "no stage has two" in message:
            return "no multi-block stage"
        if "depthwise=True" in message:
            return "depthwise only"
        if "only pointwise" in message:
            return "pointwise only"
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


def _shapes(out: Any) -> list[tuple[int, ...]]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [tuple(x.shape) for x in leaves if isinstance(x, Tensor)]


def _real_check(result: ModelResult, source: ModelSource, plan: sharify.SharingPlan, input_px: int) -> None:
    torch.manual_seed(0)
    model, _ = build_model(source)
    shared = sharify.sharify(model)
    got = {key: tuple(members) for key, (_, members) in shared_groups(shared).items()}
    want = {g.key: g.members for g in plan.groups}
    if got != want:
        raise AssertionError(f"analysis of the meta model and of the real model differ: {want} vs {got}")
    params_after = sharify.report(model, shared).params_after
    if params_after != plan.params_after:
        raise AssertionError(f"real model: report params_after {params_after} != plan params_after {plan.params_after}")

    channels, height, width = plan.input_shapes[0][1:]
    sizes = [_timm_input_size(model, input_px) or (channels, input_px, input_px), (channels, height, width)]
    model.train()
    shared.train()
    reference: list[tuple[int, ...]] | None = None
    first_error: Exception | None = None
    for size in dict.fromkeys(sizes):
        x = torch.randn(2, *size)
        try:
            with torch.no_grad():
                reference = _shapes(model(x))
            break
        except Exception as exc:  # the input does not suit the original model: try the next size
            first_error = first_error or exc
    if reference is None:
        assert first_error is not None
        raise RuntimeError(f"the original model's forward fails on {sizes}: {first_error}") from first_error
    result.real_input = "x".join(map(str, x.shape))
    out = shared(x)
    shapes = _shapes(out)
    result.output_shape = "; ".join("x".join(map(str, s)) for s in shapes)
    if shapes != reference:
        raise AssertionError(f"sharified output shapes {shapes} != original {reference}")
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    torch.stack([y.float().sum() for y in leaves if isinstance(y, Tensor) and y.is_floating_point()]).sum().backward()
    for key, (holder, _) in shared_groups(shared).items():
        grad = holder.weight.grad
        if grad is None or not torch.isfinite(grad).all():
            raise AssertionError(f"shared weight `{key}` got no (finite) gradient")
    result.real_check = "passed"


_SUGGESTIONS: list[tuple[str, dict[str, Any]]] = [
    ("depthwise=True", {"depthwise": True}),
    ("positions=['last']", {"positions": "last"}),
    ("positions='all_spatial'", {"positions": "all_spatial"}),
    ("positions='last'", {"positions": "last"}),
    ("skip_first_block=False", {"skip_first_block": False}),
]


def suggested_options(reason: str) -> list[dict[str, Any]]:
    """The options a refusal's message suggests trying (``depthwise=True``, ``positions=(2,)``, ...)."""
    out = [options for text, options in _SUGGESTIONS if text in reason]
    out += [{"positions": (int(i),)} for i in re.findall(r"positions=\((-?\d+),\)", reason)]
    return [o for i, o in enumerate(out) if o not in out[:i]]


def _alternative(model: nn.Module, plan: sharify.SharingPlan) -> tuple[str, bool]:
    """What other options would share: every dense spatial conv position (an audit of the default rule), and
    each option the refusal suggests; and whether one of those suggestions shares nothing (a misleading hint)."""
    suggested = suggested_options(plan.empty_reason())
    tries = [{"positions": "all_spatial"}, *(o for o in suggested if o != {"positions": "all_spatial"})]
    out, misleading = [], False
    for options in tries:
        label = ", ".join(f"{k}={v!r}" for k, v in options.items()) + (" (suggested)" if options in suggested else "")
        alt = sharify.plan(model, **options)
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


def _build_meta(source: ModelSource) -> tuple[nn.Module, str]:
    """The model with every parameter and buffer on the meta device, and how it was built there."""
    try:
        with torch.device("meta"):
            return build_model(source)[0], "meta"
    except Exception:  # a builder that computes with tensors cannot run under the meta device
        with registered_on_meta():
            return build_model(source)[0], "meta (moved at registration)"


def check_model(library: str, name: str, *, forward_max_params: int = 60_000_000, input_px: int = 128) -> ModelResult:
    """Runs the coverage check for one model; never raises (failures become ``outcome="error"``).

    Args:
        library: ``"torchvision"`` or ``"timm"``.
        name: Builder name in that library.
        forward_max_params: Run the real forward/backward check for shared models up to this size.
        input_px: Side of the real check's input (timm models with a fixed input size keep theirs).
    """
    start = time.perf_counter()
    result = ModelResult(library, name, family_of(library, name), variant_of(name))
    source = ModelSource(library, name)
    stage = "build"
    try:
        model, result.build = _build_meta(source)
        result.repeated_dense_convs = _repeated_dense_convs(model)
        stage = "plan"
        try:
            plan = sharify.plan(model)
        except sharify.SharifyError as exc:
            result.traced = "no" if isinstance(exc, sharify.UntraceableError) else "yes"
            result.outcome, result.reason_kind, result.reason = "nothing-to-share", _kind_of(exc), str(exc)
            result.params_before = result.params_after = sum(p.numel() for p in model.parameters())
            return result
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
                result.alternative, result.misleading_hint = _alternative(model, plan)
            return result
        if not plan.groups:
            raise AssertionError("sharify() returned a model although the plan has no groups")
        stage = "report"
        params_after = sharify.report(model, shared).params_after
        if params_after != plan.params_after:
            raise AssertionError(f"report params_after {params_after} != plan params_after {plan.params_after}")
        del shared, model
        stage = "real check"
        if plan.params_before <= forward_max_params:
            _real_check(result, source, plan, input_px)
        else:
            result.real_check = f"skipped: {plan.params_before / 1e6:.0f}M params > {forward_max_params / 1e6:.0f}M"
        result.outcome = "shared"
    except Exception as exc:
        result.outcome, result.reason_kind = "error", type(exc).__name__
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
        result.reason = f"during {stage}: {exc} [{where}]".replace("\n", " ")[:1000]
    finally:
        result.seconds = round(time.perf_counter() - start, 2)
    return result
