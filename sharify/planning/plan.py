"""What would be shared: stages, sharing groups and their parameter arithmetic. Analysis only.

:func:`plan` traces the model, propagates shapes with fake tensors, finds residual stages
(:mod:`sharify.analysis.residual`) and applies the sharing rule: in every block of a stage, the conv(s) picked
by each *position selector*; members of a stage and position with one conv signature form a group;
groups of one are left alone. Nothing in the model changes.

A model whose own forward torch.fx cannot trace at all (a detector taking a list of images, RAFT) is
analysed in its largest submodules that do trace (:mod:`sharify.analysis.descend`); the plan's paths stay relative
to the model and :attr:`SharingPlan.submodules` says which submodules were analysed and which were not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._wrappers import is_wrapper
from ..analysis.analyse import analyse
from ..analysis.descend import plan_parts, root_default_input, short_reason
from ..analysis.residual import Block, Stage
from ..analysis.shapes import as_inputs
from ..analysis.tracing import LeafSpec
from ..errors import AlreadySharifiedError, UnsupportedModelError, UntraceableError
from ..layers import SHARED_STORE_NAME, SharedStore, is_shared_conv
from .grouping import GroupFinder, check_indices, nothing_to_share_hints
from .leaves import resolve_leaf_modules
from .options import SharingOptions, sharing_options
from .parts import part_options, prefixed
from .rules import ConvSignature, SharingGroup, check_delta_keys, check_rank_stages

__all__ = ["ConvSignature", "SharingGroup", "SharingPlan", "count_params", "leaf_paths", "make_plan", "plan"]


@dataclass(frozen=True)
class SharingPlan:
    """The result of :func:`plan`: what :func:`sharify.sharify` would do, and why.

    Attributes:
        model: Class name of the analysed model.
        stages: All residual stages found (one-block stages included), in execution order.
        groups: The sharing groups.
        params_before: Parameters of the model (each tensor counted once).
        options: The options the plan was made with.
        auto_leaves: Submodules that could not be traced and were treated as opaque, with the reason.
        input_shapes: Shapes of the example inputs used for shape propagation.
        input_dtypes: Their dtypes (``"float32"``, ...).
        leaf_modules: Paths of the submodules ``leaf_modules=`` made opaque (classes resolved to the
            paths of their instances; nested ones left out). With ``input_shapes`` this is what the
            analysis needs to be repeated: :func:`sharify.save` records both in the recipe.
        notes: Remarks on the analysis: where shape propagation stopped, why candidates were left out.
        convs_without_shape: Conv calls that shape propagation could not reach (their stages were
            not analysed; ``sharify`` warns when this is not 0).
        trace_stopped: Where torch.fx stopped tracing the root's own forward (data-dependent control flow
            after the stages, say): only what the forward computes before that point was analysed
            (``sharify`` warns). ``None`` when the whole forward was traced.
        submodules: When the root's own forward cannot be traced at all (a detector, optical flow), its
            submodules were analysed instead (:mod:`sharify.analysis.descend`): for each submodule tried, by path,
            ``"analysed with ..."`` (the inputs used) or ``"not analysed: <why>"``. Empty otherwise.
    """

    model: str
    stages: tuple[Stage, ...]
    groups: tuple[SharingGroup, ...]
    params_before: int
    options: dict[str, Any]
    auto_leaves: dict[str, str] = field(default_factory=dict)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    input_dtypes: tuple[str, ...] = ()
    leaf_modules: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    convs_without_shape: int = 0
    trace_stopped: str | None = None
    submodules: dict[str, str] = field(default_factory=dict)

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(b for s in self.stages for b in s.blocks)

    @property
    def params_saved(self) -> int:
        return sum(g.params_saved for g in self.groups)

    @property
    def params_after(self) -> int:
        return self.params_before - self.params_saved

    @property
    def reduction(self) -> float:
        """Fraction of parameters saved."""
        return self.params_saved / self.params_before if self.params_before else 0.0

    def empty_reason(self) -> str:
        """Why the plan has no groups, with what to try (empty string when it has groups)."""
        if self.groups:
            return ""
        hints = list(self.notes)
        if self.auto_leaves:
            hints.append(
                "these submodules could not be traced and were not analysed: "
                + ", ".join(f"`{p}` ({r})" for p, r in self.auto_leaves.items())
            )
        if not self.stages:
            why = (
                f"no residual blocks found in {self.model} (no addition of a conv or Linear branch to a same-shaped "
                "shortcut); sharify shares layers between the residual blocks of a stage"
            )
            if self.auto_leaves:
                hints.append(
                    "if they hold the residual blocks, make their forward traceable by torch.fx, or pass "
                    "leaf_modules=[...] naming only the untraceable code inside them"
                )
            if not any(n.startswith("the model has no Conv2d or Linear") for n in self.notes):
                shapes = ", ".join(str(tuple(s)) for s in self.input_shapes) or "none"
                hints.append(
                    f"if {self.model} does add conv or Linear branches to shortcuts, pass example_inputs= it accepts "
                    f"(analysed with {shapes}) and leaf_modules= for submodules torch.fx must not trace into; a "
                    "network without residual additions (VGG, DenseNet, Inception) has nothing ShaResNet-style to share"
                )
        elif all(len(s.blocks) < 2 for s in self.stages):
            why = f"residual blocks found in {self.model}, but no stage has two consecutive blocks of one output shape"
            each = (
                "its only residual block forms a one-block stage"
                if len(self.blocks) == 1
                else f"its {len(self.blocks)} residual blocks each form a one-block stage (consecutive blocks differ "
                "in output shape: channels or resolution)"
            )
            hints.append(f"{each}, so no two can share a conv; this architecture has nothing ShaResNet-style to share")
        else:
            why = (
                f"residual blocks found in {self.model}, but no two convs picked by positions="
                f"{self.options['positions']!r} with the same signature in a stage"
            )
        return why + ("; " + "; ".join(hints) if hints else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "model": self.model,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_saved": self.params_saved,
            "reduction": self.reduction,
            "options": self.options,
            "input_shapes": [list(s) for s in self.input_shapes],
            "input_dtypes": list(self.input_dtypes),
            "leaf_modules": list(self.leaf_modules),
            "auto_leaves": self.auto_leaves,
            "notes": list(self.notes),
            "submodules": dict(self.submodules),
            "stages": [
                {
                    "path": s.path,
                    "shape": list(s.shape),
                    "blocks": [b.path for b in s.blocks],
                    "first_block": None if s.first_block is None else s.first_block.path,
                }
                for s in self.stages
            ],
            "groups": [
                {**asdict(g), "signature": str(g.signature), "size": g.size, "params_saved": g.params_saved}
                for g in self.groups
            ],
        }

    def __str__(self) -> str:
        lines = [
            f"SharingPlan for {self.model}: {len(self.groups)} groups, "
            f"{self.params_before:,} -> {self.params_after:,} params ({-self.reduction:+.1%})"
        ]
        for grp in self.groups:
            lines.append(f"  {grp.key}: {len(grp.members)} x [{grp.signature}] saves {grp.params_saved:,}")
            lines.extend(f"    {m}" for m in grp.members)
        if not self.groups:  # the reason already lists the notes and the untraced submodules
            lines.append(f"  nothing to share: {self.empty_reason()}")
            lines.extend(f"  submodule {path}: {status}" for path, status in self.submodules.items())
            return "\n".join(lines)
        for path, reason in self.auto_leaves.items():
            lines.append(f"  not traced (treated as a leaf): {path}: {reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  submodule {path}: {status}" for path, status in self.submodules.items())
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_model(model: object) -> None:
    """Raises a clear error if ``model`` is not an eager module sharify can rewrite.

    Wrappers (DDP, DataParallel, ``torch.compile``'s ``OptimizedModule``) are refused rather than
    unwrapped: DDP has already registered the unshared parameters with its reducer and broadcast
    them, and dynamo has guarded on them, so a rewrite underneath would leave the wrapper stale,
    while returning the unwrapped result would silently change the type the caller gets back. The
    message tells the user to sharify the bare model and wrap the result. Functions that only read
    a model (:func:`sharify.save`, :func:`sharify.verify`) look through wrappers instead.
    """
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise TypeError(
            f"sharify expects a torch.nn.Module instance, got the class {model.__name__}; build the model first"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"sharify expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "got a TorchScript module; sharify rewrites eager modules: call sharify(model) before torch.jit.script"
        )
    if is_wrapper(model):
        raise UnsupportedModelError(
            f"got a {type(model).__name__} wrapper; sharify the bare model first and wrap the result "
            "(shared = sharify(model); DDP(shared) / torch.compile(shared)), because the wrapper has already "
            "registered the unshared parameters"
        )
    shared = next((p for p, m in model.named_modules() if is_shared_conv(m)), None)
    store = next((p for p, m in model.named_modules() if isinstance(m, SharedStore)), None)
    if shared is not None or store is not None or hasattr(model, SHARED_STORE_NAME):
        scope = (store or "").rpartition(".")[0]
        where = f": its submodule `{scope}` was sharified" if scope else ""
        raise AlreadySharifiedError(
            f"{type(model).__name__} is already sharified{where} (e.g. `{shared or store or SHARED_STORE_NAME}`); "
            "pass the original model, or call sharify.unshare(model) first (to shrink another part of it, "
            "sharify that submodule in place: sharify.sharify(model.<submodule>, inplace=True))"
        )


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each tensor counted once."""
    return sum(p.numel() for p in model.parameters())


#: The parameters of :func:`plan` besides the sharing options (named in the error for an unknown keyword).
_PLAN_ARGS = ("model", "options", "example_inputs", "leaf_modules")


def plan(
    model: nn.Module,
    options: SharingOptions | None = None,
    *,
    preset: str | None = None,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    leaf_modules: LeafSpec | None = None,
    **overrides: Any,
) -> SharingPlan:
    """Analyses ``model`` and returns what :func:`sharify.sharify` would share. Changes nothing.

    Args:
        model: Any ``nn.Module`` built of residual blocks.
        options: What to share and how (:class:`~sharify.SharingOptions`, whose fields document every
            option); default: ``SharingOptions(preset=preset, **overrides)``.
        preset: A named variant of the papers (:data:`sharify.planning.options.PRESETS`), e.g. ``"dsfb-shared++"``,
            whose values the options not given take (not with ``options``, which hold their own).
        example_inputs: Inputs for shape propagation, one tensor per positional input of the forward (its
            other parameters keep their defaults); default ``(1, C, H, W)`` from timm's
            ``pretrained_cfg["input_size"]`` or a Hugging Face ``config`` (``num_channels``, ``image_size``),
            else 3x224x224, C from the first conv.
        leaf_modules: Module classes or paths not to trace into.
        **overrides: Fields of :class:`~sharify.SharingOptions` (``positions``, ``skip_first_block``, ``init``,
            ...), each replacing the preset's or ``options``' value (``None``: not given). ``init`` and ``align``
            matter here only where they change the plan: ``init="scaled"`` adds gains to the arithmetic,
            ``align=True`` finds each member's free channels (``group.slots``).

    Returns:
        The plan; ``plan.groups`` is empty when nothing can be shared (``plan.empty_reason()`` says why).

    Raises:
        TypeError: ``example_inputs`` is not a tensor or a tuple/list of tensors, or has more tensors than
            the forward takes positional inputs.
        ValueError: Unknown preset/selector/method, a selector given twice, an index out of range for
            every branch, bad ranks (or a rank mapping with a missing or unknown stage path), or
            ``method="basis"`` on a position that is not a dense 3x3 conv; a ``leaf_modules`` path that names
            no submodule; empty ``example_inputs``.
        TypeError: An option, ``example_inputs`` or ``leaf_modules`` entry of the wrong type, or ``model`` is no
            ``nn.Module``; an unknown keyword (the message names the closest option); ``options`` together with
            ``preset``.
        AlreadySharifiedError: ``model`` already shares convs (as :func:`sharify.sharify` refuses it).
        UnsupportedModelError: A TorchScript module or a DDP / DataParallel / ``torch.compile`` wrapper: plan
            the bare model.
        UntraceableError: The model cannot be traced where its stages are, and none of its submodules
            analysed in its place (when its own forward cannot be traced) has anything to share.

    Example:
        >>> import torchvision, sharify
        >>> p = sharify.plan(torchvision.models.resnet34())
        >>> [g.key for g in p.groups]
        ['layer1.conv2', 'layer2.conv2', 'layer3.conv2', 'layer4.conv2']
        >>> sharify.plan(torchvision.models.resnet50(), preset="dsfb-shared++").params_after
        18262056
    """
    check_model(model)  # as sharify() does: a wrapped or already sharified model is refused the same way
    sharing = sharing_options(options, preset, overrides, caller="plan()", others=_PLAN_ARGS)
    return make_plan(model, sharing, example_inputs=example_inputs, leaf_modules=leaf_modules)


def make_plan(
    model: nn.Module,
    options: SharingOptions,
    *,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    leaf_modules: LeafSpec | None = None,
) -> SharingPlan:
    """:func:`plan` with already resolved :class:`~sharify.planning.options.SharingOptions`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan expects a torch.nn.Module, got {type(model).__name__}")
    leaf_modules = resolve_leaf_modules(model, leaf_modules)
    inputs = as_inputs(example_inputs)
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()):
        # Nothing to share, and nothing to trace for.
        no_convs = ("the model has no Conv2d or Linear layers",)
        return SharingPlan(type(model).__name__, (), (), count_params(model), options.to_dict(), notes=no_convs)
    try:
        return _analyse(model, options, inputs, leaf_modules)
    except UntraceableError as exc:
        if getattr(exc, "module_path", None) != "":
            raise  # a submodule stays untraceable: leaf_modules can help
        return _plan_of_parts(model, options, inputs, leaf_modules, exc)


def _plan_of_parts(
    model: nn.Module,
    options: SharingOptions,
    inputs: tuple[Tensor, ...] | None,
    leaf_modules: LeafSpec | None,
    error: UntraceableError,
) -> SharingPlan:
    """The plan of a model whose own forward cannot be traced, from its submodules (:mod:`sharify.analysis.descend`)."""
    # The root's inputs decide the recorded calls, so they are recorded as the analysis inputs (load repeats them).
    inputs = inputs if inputs is not None else root_default_input(model)

    def analyse(path: str, part: nn.Module, x: tuple[Tensor, ...] | None, leaves: LeafSpec | None) -> SharingPlan:
        return _analyse(part, part_options(options, path), x, leaves)

    parts, status = plan_parts(model, inputs, leaf_modules, error, analyse)
    stages, groups, auto_leaves, notes = prefixed(parts)
    if options.method == "basis":  # rank mappings: keys of stages no part has are refused, as for a whole model
        check_rank_stages(options, [s.path for s in stages])
    analysed = ", ".join(f"`{p}`" for p, _ in parts)
    reason = getattr(error, "reason", str(error))
    head = (
        f"torch.fx cannot trace `{type(model).__name__}.forward` ({short_reason(reason)}): its submodules "
        f"{analysed} were analysed instead; convs elsewhere are not shared (see submodules)"
    )
    return _new_plan(
        model,
        options,
        leaf_modules,
        inputs,
        stages=tuple(stages),
        groups=tuple(groups),
        auto_leaves=auto_leaves,
        convs_without_shape=sum(part.convs_without_shape for _, part in parts),
        notes=(head, *notes),
        submodules=status,
    )


def _analyse(
    model: nn.Module, options: SharingOptions, inputs: tuple[Tensor, ...] | None, leaf_modules: LeafSpec | None
) -> SharingPlan:
    """The plan of ``model`` from its own trace (raises :class:`UntraceableError` where that is impossible)."""
    found = analyse(model, inputs, leaf_modules)
    traced, shapes, stages = found.trace, found.shapes, found.stages
    finder = GroupFinder(model, traced.graph, stages)
    groups, seen = finder.groups(options)
    check_indices(options.positions, seen.branch_lengths, type(model).__name__)
    if options.method == "basis" and finder.stage_paths:
        check_rank_stages(options, finder.stage_paths)
    notes = seen.notes()  # convs a selector picked that cannot be members
    if traced.stopped is not None:
        if not groups:
            raise traced.untraceable_error("the part of the forward traced before that point holds nothing to share")
        notes.append(f"torch.fx could not trace {traced.stopped}: blocks the forward runs after that are not shared")
    if shapes.failure is not None:
        lost = (
            f"; {shapes.convs_without_shape} conv calls after it were not analysed"
            if shapes.convs_without_shape
            else ""
        )
        notes.append(f"shape propagation stopped at {shapes.failure}{lost}")
    if not groups and seen.branch_lengths:
        notes += nothing_to_share_hints(options, seen, finder)
    return _new_plan(
        model,
        options,
        leaf_modules,
        shapes.inputs,
        stages=tuple(stages),
        groups=tuple(groups),
        auto_leaves=traced.auto_leaves,
        convs_without_shape=shapes.convs_without_shape,
        trace_stopped=traced.stopped,
        notes=tuple(notes),
    )


def _new_plan(
    model: nn.Module,
    options: SharingOptions,
    leaf_modules: LeafSpec | None,
    inputs: Sequence[Tensor],
    **found: Any,
) -> SharingPlan:
    """A :class:`SharingPlan` of ``model`` with what the analysis ``found`` (stages, groups, notes, ...).

    Raises:
        ValueError: A ``delta_rank`` mapping key that names no stage or group; a ``param_budget`` below what
            full sharing reaches.
    """
    groups: tuple[SharingGroup, ...] = found.get("groups", ())
    stages: tuple[Stage, ...] = found.get("stages", ())
    check_delta_keys(options, [s.path for s in stages], [g.key for g in groups])
    if options.param_budget is not None and groups:
        note = _check_budget(options.param_budget, count_params(model), groups)
        found["notes"] = (*found.get("notes", ()), note)
    return SharingPlan(
        model=type(model).__name__,
        params_before=count_params(model),
        options=options.to_dict(),
        input_shapes=tuple(tuple(x.shape) for x in inputs),
        input_dtypes=tuple(str(x.dtype).removeprefix("torch.") for x in inputs),
        leaf_modules=leaf_paths(model, leaf_modules),
        **found,
    )


def _check_budget(budget: float, before: int, groups: Sequence[SharingGroup]) -> str:
    """The plan's note on ``param_budget``; ``ValueError`` when full sharing alone exceeds the budget."""
    full = before - sum(g.params_saved for g in groups)
    allowed = math.floor(budget * before)
    if full > allowed:
        smallest = math.ceil(full / before * 10_000) / 10_000
        raise ValueError(
            f"param_budget={budget} allows {allowed:,} of the original's {before:,} parameters, but sharing every "
            f"group fully already leaves {full:,} ({full / before:.2%}); the smallest possible budget here is "
            f"{smallest} (share more -- other positions, or skip_first_block=False -- to go lower)"
        )
    return (
        f"param_budget={budget}: each group's delta rank is chosen from the weights when the plan is applied, "
        f"spending at most {allowed - full:,} parameters on deltas ({allowed:,} in all); params_after counts full "
        "sharing"
    )


def leaf_paths(model: nn.Module, leaf_modules: LeafSpec | None) -> tuple[str, ...]:
    """Paths of the submodules a ``leaf_modules=`` spec (classes and/or paths) makes opaque, outermost only.

    Convs are leaves anyway and are left out, so the result is what a recipe must record to repeat
    the analysis.
    """
    spec = list(leaf_modules or ())
    types = tuple(x for x in spec if isinstance(x, type))
    paths = {x for x in spec if isinstance(x, str)}
    out: list[str] = []
    for path, module in model.named_modules():
        if not path or isinstance(module, nn.Conv2d) or any(path.startswith(o + ".") for o in out):
            continue
        if path in paths or isinstance(module, types):
            out.append(path)
    return tuple(out)
