"""Rewriting a model so that each sharing group reads one tensor: :func:`sharify` and :func:`unshare`.

The rewrite works on the model's own module tree (no GraphModule): the result keeps its class and
everything defined on it. It is two passes: :func:`compute_edits` computes every change from the model and the
plan -- new tensors, holders, modules, folded BatchNorm values, alignment permutations -- as an :class:`Edits`,
assigning nothing; :func:`apply_edits` makes them with one undo log and, if one fails, restores the model, so a
caller's model is never left half-modified, even with ``inplace=True``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import Tensor, nn

from .._wrappers import is_wrapper
from ..analysis.tracing import LeafSpec
from ..errors import NothingToShareError, SharifyError, UnsupportedModelError
from ..layers import (
    SHARED_STORE_NAME,
    Delta,
    SharedConvParams,
    SharedStore,
    attach_to_holder,
    detach_from_holder,
    is_shared_conv,
)
from ..planning.grouping import computed_tensor_reason
from ..planning.options import SharingOptions, check_flag, check_method_and_init, sharing_options
from ..planning.plan import ConvSignature, SharingGroup, SharingPlan, check_model, make_plan
from .align import alignment
from .basis import BasisConv2d, svd_bases
from .delta import Decomposition, GroupSpectra, MemberTarget, budget_ranks
from .init import initial_tensors, scaled_tensors

__all__ = ["Attach", "Edits", "apply_edits", "apply_plan", "check_model", "compute_edits", "sharify", "unshare"]

ModelT = TypeVar("ModelT", bound=nn.Module)


#: The parameters of :func:`sharify` besides the sharing options (named in the error for an unknown keyword).
_SHARIFY_ARGS = ("model", "options", "example_inputs", "leaf_modules", "inplace")


def sharify(
    model: ModelT,
    options: SharingOptions | None = None,
    *,
    preset: str | None = None,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    leaf_modules: LeafSpec | None = None,
    inplace: bool = False,
    **overrides: Any,
) -> ModelT:
    """Returns ``model`` with the convs of each residual stage sharing one weight.

    By default this is ShaResNet's rule (Boulch, 2017): in every block of a stage, the last spatial
    conv of the residual branch; members with one signature share one tensor. The stages are found
    by tracing the model with torch.fx, so any ResNet-like network works, not a list of classes.
    What is shared and how is a :class:`~sharify.SharingOptions` (its fields document every option), given as
    ``options`` or as keywords: ``sharify(model, positions=("first",))`` is
    ``sharify(model, SharingOptions(positions=("first",)))``.

    Args:
        model: The model; with ``inplace=False`` it is not modified.
        options: The sharing options; default: ``SharingOptions(preset=preset, **overrides)``.
        preset: A published variant, e.g. ``"sharesnet-wrn"``, ``"dsfb-shared++"`` (see
            :mod:`sharify.planning.options`), whose values the options not given take (an explicit ``method``
            other than the preset's also drops the preset's ``init``, which belongs to its method). Not with
            ``options``, which hold their own.
        example_inputs: Inputs for shape propagation (see :func:`sharify.plan`).
        leaf_modules: Module classes or paths not to trace into (a bare string is one path).
        inplace: Rewrite ``model`` itself instead of a deep copy.
        **overrides: Fields of :class:`~sharify.SharingOptions` (``positions``, ``skip_first_block``, ``init``,
            ...), each replacing the preset's or ``options``' value (``None``: not given).

    Returns:
        The sharified model, of the same class as ``model``. Every module the rewrite creates takes the
        train/eval mode of the conv it replaces (the store of shared tensors: the model's). A shared tensor is
        frozen when the members' tensors all were (``requires_grad=False``); when only some were, it is
        trainable and a warning names the frozen members.

    Raises:
        NothingToShareError: The model has no two convs to share; the message says why.
        AlreadySharifiedError: The model already shares convs.
        UnsupportedModelError: A TorchScript module, or a DDP / DataParallel / ``torch.compile``
            wrapper: sharify the bare model, then wrap the result (see :func:`check_model`).
        ValueError: Unknown preset, selector, method or init; a selector given twice or an index out of
            range for every branch; bad ranks; a ``leaf_modules`` path that names no submodule. The model is
            unchanged.
        TypeError: ``model`` is no ``nn.Module``; an option of the wrong type (``inplace="no"``, a float
            position, ...); an unknown keyword (the message names the closest option); ``options`` together with
            ``preset``. The model is unchanged.

    Example:
        >>> import torchvision, sharify
        >>> model = torchvision.models.resnet34()
        >>> shared = sharify.sharify(model)
        >>> isinstance(shared, torchvision.models.ResNet), sharify.report(model, shared).params_after
        (True, 13613864)
    """
    check_model(model)
    check_flag("inplace", inplace)
    options = sharing_options(options, preset, overrides, caller="sharify()", others=_SHARIFY_ARGS)
    sharing = make_plan(model, options, example_inputs=example_inputs, leaf_modules=leaf_modules)
    if sharing.trace_stopped is not None:
        warnings.warn(
            f"torch.fx could not trace {sharing.trace_stopped}; the stages before that point are shared, blocks "
            "the forward runs after it are not (move the untraceable code into a submodule to analyse the rest)",
            stacklevel=2,
        )
    if sharing.submodules:
        warnings.warn(f"{sharing.notes[0]}; plan.submodules lists what was analysed", stacklevel=2)
    if sharing.convs_without_shape:
        stop = next(n for n in sharing.notes if n.startswith("shape propagation stopped"))
        warnings.warn(
            f"{stop}: stages there were not analysed; pass example_inputs the whole model accepts", stacklevel=2
        )
    return apply_plan(model, sharing, inplace=inplace)


def _deepcopy(model: ModelT) -> ModelT:
    """``copy.deepcopy(model)``, also of a model whose forward pre-hooks left computed tensors on its modules
    (legacy ``torch.nn.utils.weight_norm``/``spectral_norm`` set ``conv.weight`` to a non-leaf tensor, which
    deepcopy refuses): those are copied detached; the hook recomputes them at the next forward."""
    computed = [
        (m, name, value)
        for m in model.modules()
        for name, value in list(vars(m).items())
        if isinstance(value, Tensor) and not value.is_leaf
    ]
    try:
        for m, name, value in computed:
            setattr(m, name, value.detach())
        return copy.deepcopy(model)
    finally:
        for m, name, value in computed:
            setattr(m, name, value)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def _basis_modules(
    group: SharingGroup, convs: list[nn.Conv2d], init: str, weights: list[Tensor], biases: list[Tensor | None]
) -> tuple[SharedConvParams, list[BasisConv2d]]:
    """The holder of a ``"basis"`` group and one new :class:`BasisConv2d` per member, reading it."""
    s, u = group.shared_rank, group.unique_rank
    modules = [BasisConv2d(c, s, u) for c in convs]
    for conv, module in zip(convs, modules):  # the new modules take the conv's mode and trainability
        module.train(conv.training).requires_grad_(conv.weight.requires_grad)
    first = convs[0]
    shared = torch.empty((s, *first.weight.shape[1:]), dtype=first.weight.dtype, device=first.weight.device)
    if not shared.is_meta:
        with torch.no_grad():
            if init == "svd":
                basis, uniques, coeffs = svd_bases(weights, s, u)
                shared.copy_(basis.view_as(shared))
                for module, bias, unique, coeff in zip(modules, biases, uniques, coeffs):
                    module.unique.weight.copy_(unique.view_as(module.unique.weight))
                    module.coeff.weight.copy_(coeff.view_as(module.coeff.weight))
                    if bias is not None and module.coeff.bias is not None:
                        module.coeff.bias.copy_(bias)
                    module.set_identity_norm()
            else:
                nn.init.orthogonal_(shared)
    holder = SharedConvParams(shared, None, key=group.key, stage=group.stage, position=group.position, method="basis")
    for module in modules:
        attach_to_holder(module.shared, holder)  # new modules: no change to the model
    return holder, modules


def _set_trainable(holder: SharedConvParams, group: SharingGroup, convs: list[nn.Conv2d]) -> None:
    """Freezes each shared tensor whose members' tensors were all frozen; warns when only some were."""
    for name in ("weight", "bias"):
        shared = getattr(holder, name)
        if shared is None:
            continue
        frozen = [p for p, c in zip(group.members, convs) if not getattr(c, name).requires_grad]
        shared.requires_grad_(len(frozen) < len(convs))
        if 0 < len(frozen) < len(convs):
            warnings.warn(
                f"{', '.join(f'`{p}`' for p in frozen)} had a frozen {name} (requires_grad=False), but other members "
                f"of group `{group.key}` did not: the shared {name} `{SHARED_STORE_NAME}.{group.key}.{name}` is "
                "trainable, so training changes it in the frozen members too; freeze all members, or the shared "
                f"{name} after sharify (its .requires_grad_(False))",
                stacklevel=_outside_sharify(),
            )


def _outside_sharify() -> int:
    """The ``stacklevel`` of the first caller outside this package, for warnings raised deep inside it."""
    package = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _fold_gain(norm: nn.modules.batchnorm._BatchNorm, gain: Tensor, current: dict[str, Tensor]) -> dict[str, Tensor]:
    """New BatchNorm values such that ``norm'(y) == norm(gain * y)`` (eval mode; train mode up to eps).

    ``current`` holds the values the rewrite has already given the BatchNorm (channel alignment), if any.
    """
    mean, var, weight = (current.get(k, getattr(norm, k)) for k in ("running_mean", "running_var", "weight"))
    assert mean is not None and var is not None
    with torch.no_grad():
        a = torch.where(gain.abs() < 1e-8, torch.full_like(gain, 1e-8), gain)
        return {
            "running_mean": mean / a,
            "running_var": ((var + norm.eps) / a.square() - norm.eps).clamp_min(0),
            "weight": weight * a.sign(),
        }


def _alignment(
    sharing: SharingPlan, modules: dict[str, nn.Module]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, list[int]]]]:
    """The plan's channel alignment (:func:`sharify.rewrite.align.alignment`) on ``modules``' current tensors."""
    groups = [(g.members, g.slots) for g in sharing.groups if g.slots]
    if not groups:
        return {}, {}

    def read(path: str, name: str) -> Tensor | None:
        value = getattr(modules[path], name, None)
        return value.detach() if isinstance(value, Tensor) else None

    return alignment(groups, read)


def _assign(module: nn.Module, values: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(value)


class Attach(NamedTuple):
    """A member conv to make read its group's holder (:func:`sharify.layers.attach_to_holder`)."""

    path: str
    holder: SharedConvParams
    gain: Tensor | None  # per-output-channel gain the member keeps as its ``shared_gain`` parameter, if any
    gain_trainable: bool  # the ``requires_grad`` of its own parameters (gain, delta): that of the conv's weight
    delta: Delta | None = None  # its low-rank delta (relaxed sharing), if any


@dataclass
class Edits:
    """Everything :func:`apply_plan` changes in a model, computed before the first change (:func:`compute_edits`).

    Attributes:
        store: The new store of shared tensors, holding every group's holder, to register as the model's
            ``sharify_shared``.
        attach: Member convs that become ``Shared<Class>`` modules reading their holder, in order.
        replace: ``(path, new module)`` per member replaced by a new module (``method="basis"``).
        assign: ``{module path: {tensor name: value}}``: values copied into existing tensors (the channel
            alignment of members' neighbours, BatchNorms absorbing ``init="scaled"`` gains).
    """

    store: SharedStore
    attach: list[Attach] = field(default_factory=list)
    replace: list[tuple[str, nn.Module]] = field(default_factory=list)
    assign: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def _new_store(sharing: SharingPlan, init: str) -> SharedStore:
    """An empty store recording the plan's options (with ``init``) and, if the plan has them, its analysis inputs."""
    analysis = {
        "input_shapes": [list(x) for x in sharing.input_shapes],
        "input_dtypes": list(sharing.input_dtypes),
        "leaf_modules": list(sharing.leaf_modules),
    }
    return SharedStore({**sharing.options, "init": init}, analysis if sharing.input_shapes else None)


def _group_edits(
    group: SharingGroup,
    modules: dict[str, nn.Module],
    weights: list[Tensor],
    biases: list[Tensor | None],
    init: str,
    edits: Edits,
) -> tuple[SharedConvParams, list[Tensor] | None]:
    """Adds one group's edits to ``edits``, from its members' current ``weights`` and ``biases``; returns its holder
    and, with ``init="scaled"``, the members' gains (kept or folded into their BatchNorm)."""
    convs = [cast(nn.Conv2d, modules[p]) for p in group.members]
    gains: list[Tensor] | None = None
    if group.method == "basis":
        holder, bases = _basis_modules(group, convs, init, weights, biases)
        edits.replace.extend(zip(group.members, bases))
    elif init == "scaled":
        weight, bias, gains = scaled_tensors(weights, biases)
        holder = SharedConvParams(
            weight, bias, key=group.key, stage=group.stage, position=group.position, init="scaled"
        )
        for path, conv, gain, norm in zip(group.members, convs, gains, group.norms or [None] * len(convs)):
            trainable = conv.weight.requires_grad
            if norm is None:
                edits.attach.append(Attach(path, holder, gain, trainable))
            else:  # the BatchNorm absorbs the gain: no extra parameter
                edits.attach.append(Attach(path, holder, None, trainable))
                bn = cast(nn.modules.batchnorm._BatchNorm, modules[norm])
                edits.assign.setdefault(norm, {}).update(_fold_gain(bn, gain, edits.assign.get(norm, {})))
    else:
        weight, bias = initial_tensors(weights, biases, init)
        holder = SharedConvParams(weight, bias, key=group.key, stage=group.stage, position=group.position)
        edits.attach.extend(Attach(p, holder, None, c.weight.requires_grad) for p, c in zip(group.members, convs))
    _set_trainable(holder, group, convs)
    return holder, gains


class _Relaxed(NamedTuple):
    """A ``method="share"`` group as the deltas need it: its holder, each member's target, and (filled when a rank
    is needed) the SVD of what the shared weight misses of each member."""

    group: SharingGroup
    holder: SharedConvParams
    targets: list[MemberTarget]
    decompositions: list[Decomposition]

    def decompose(self) -> list[Decomposition]:
        if not self.decompositions:
            with torch.no_grad():
                self.decompositions.extend(Decomposition.of(t, self.holder.weight) for t in self.targets)
        return self.decompositions


def _delta_ranks(sharing: SharingPlan, relaxed: list[_Relaxed]) -> dict[str, int]:
    """Each group's delta rank: the plan's, or with ``param_budget`` chosen from the members' spectra."""
    budget = sharing.options.get("param_budget")
    if budget is None:
        return {r.group.key: r.group.delta_rank for r in relaxed}
    if any(r.holder.weight.is_meta for r in relaxed):
        raise ValueError(
            "param_budget chooses the delta ranks from the members' weights, but the model is on the meta device; "
            "sharify the model with its weights, or pass the ranks as delta_rank={group key: rank}"
        )
    available = math.floor(budget * sharing.params_before) - sharing.params_after
    spectra = []
    for r in relaxed:
        found, g = r.decompose(), r.group
        spectra.append(GroupSpectra(g.key, [d.values for d in found], [d.scale for d in found],
                                    g.signature.out_channels, g.row_size, g.bias_numel))  # fmt: skip
    return budget_ranks(spectra, available)


def _delta_edits(edits: Edits, relaxed: list[_Relaxed], ranks: dict[str, int]) -> None:
    """Gives each member of a group with a delta rank its truncated SVD delta (:mod:`sharify.rewrite.delta`)."""
    deltas: dict[str, Delta] = {}
    for r in relaxed:
        rank = ranks.get(r.group.key, 0)
        if not rank:
            continue
        shared, bias = r.holder.weight, r.holder.bias
        if shared.is_meta:  # shapes only (a model built on the meta device, to be loaded)
            out, row = r.group.signature.out_channels, r.group.row_size
            empty = partial(torch.empty, device="meta", dtype=shared.dtype)
            deltas.update((p, Delta(empty(out, rank), empty(rank, row), None if bias is None else empty(out)))
                          for p in r.group.members)  # fmt: skip
            continue
        with torch.no_grad():
            for path, target, found in zip(r.group.members, r.targets, r.decompose()):
                deltas[path] = found.delta(rank, target, shared, bias)
    edits.attach = [a._replace(delta=deltas.get(a.path)) for a in edits.attach]


def compute_edits(model: nn.Module, sharing: SharingPlan, init: str) -> Edits:
    """Every change :func:`apply_plan` makes to ``model`` for ``sharing``; nothing in ``model`` is modified.

    The shared tensors are computed from the members' current tensors, after channel alignment (its permuted
    tensors are not assigned, only read); the holders, store and new modules are new objects.
    """
    modules = dict(model.named_modules())
    edits = Edits(_new_store(sharing, init))
    # Channel alignment: permuted tensors of members and their neighbours (sharify.align), nothing assigned yet.
    aligned, edits.store.alignment = _alignment(sharing, modules) if init not in ("random", "orthogonal") else ({}, {})
    members = {p for g in sharing.groups for p in g.members}
    edits.assign = {p: dict(values) for p, values in aligned.items() if p not in members}  # members' tensors go

    def current(path: str, name: str) -> Tensor | None:  # a tensor as the rewrite sees it: aligned or as it is
        return aligned.get(path, {}).get(name, getattr(modules[path], name))

    relaxed: list[_Relaxed] = []
    for group in sharing.groups:
        weights = [cast(Tensor, current(p, "weight")) for p in group.members]
        biases = [current(p, "bias") for p in group.members]
        holder, gains = _group_edits(group, modules, weights, biases, init, edits)
        edits.store.add_holder(holder)
        if group.method == "share":
            per_member: list[Tensor | None] = list(gains) if gains else [None] * len(weights)
            relaxed.append(
                _Relaxed(group, holder, [MemberTarget.of(w, b, a) for w, b, a in zip(weights, biases, per_member)], [])
            )
    ranks = _delta_ranks(sharing, relaxed)
    _delta_edits(edits, relaxed, ranks)
    if sharing.options.get("param_budget") is not None:  # the model records the ranks chosen, which load repeats
        edits.store.options.update(delta_rank={k: r for k, r in ranks.items() if r}, param_budget=None)
    edits.store.train(model.training)  # the holders take the mode of the model they join
    return edits


def _restore_conv(conv: nn.Module, cls: type, params: dict[str, nn.Parameter | None]) -> None:
    """Undoes :func:`~sharify.layers.attach_to_holder`, even a partial one: ``conv`` regains its class and tensors."""
    conv.__dict__.pop("_sharify_holder", None)
    conv.__class__ = cls
    conv._parameters.clear()
    conv._parameters.update(params)


def apply_edits(model: nn.Module, edits: Edits) -> None:
    """Makes ``edits`` in ``model``, all or nothing.

    Before each change, its inverse goes into one undo log; on any exception the log is replayed in reverse and
    the exception re-raised, so ``model`` is left as it was.
    """
    modules = dict(model.named_modules())
    undo: list[Callable[[], object]] = []
    try:
        undo.append(partial(model._modules.pop, SHARED_STORE_NAME, None))
        model.add_module(SHARED_STORE_NAME, edits.store)
        for path, holder, gain, trainable, delta in edits.attach:
            conv = modules[path]
            undo.append(partial(_restore_conv, conv, type(conv), dict(conv._parameters)))
            attach_to_holder(conv, holder, gain, delta)
            for name in conv._sharify_member_parameters:  # a member now
                own = conv._parameters.get(name)
                if own is not None:
                    own.requires_grad_(trainable)
        for path, module in edits.replace:
            undo.append(partial(_set_module, model, path, modules[path]))
            _set_module(model, path, module)
        for path, values in edits.assign.items():
            module = modules[path]
            undo.append(partial(_assign, module, {k: getattr(module, k).detach().clone() for k in values}))
            _assign(module, values)
    except BaseException:
        for step in reversed(undo):
            step()
        raise


def _check_plan_fits(model: nn.Module, sharing: SharingPlan) -> None:
    """Raises a :class:`~sharify.errors.SharifyError` unless every member of ``sharing`` is a conv of ``model``
    with the group's signature that can still be shared."""
    modules = dict(model.named_modules())
    for group in sharing.groups:
        for path in group.members:
            conv = modules.get(path)
            if not isinstance(conv, (nn.Conv2d, nn.Linear)) or ConvSignature.of(conv) != group.signature:
                raise SharifyError(
                    f"the plan does not match the model: `{path}` is not a layer with signature [{group.signature}]; "
                    "make the plan from this model (sharify.plan(model))"
                )
            reason = computed_tensor_reason(conv)
            if reason is not None:  # parametrized after the plan was made
                raise SharifyError(
                    f"the plan does not match the model: `{path}` cannot be a member: {reason}; make the plan from "
                    "this model (sharify.plan(model) leaves such convs out)"
                )


def apply_plan(model: ModelT, sharing: SharingPlan, *, init: str | None = None, inplace: bool = False) -> ModelT:
    """Applies a :class:`~sharify.planning.plan.SharingPlan` made for ``model`` (or an identical model).

    Every edit is computed first (:func:`compute_edits`), then made with one undo log (:func:`apply_edits`): if
    making them fails, the model is restored, so it is never left half-modified, even with ``inplace=True``.

    Args:
        model: The model the plan was made for.
        sharing: The plan.
        init: Overrides the plan's ``options["init"]``.
        inplace: Rewrite ``model`` itself instead of a deep copy.

    Raises:
        NothingToShareError: The plan has no groups.
        SharifyError: The plan does not match the model.
        TypeError: ``sharing`` is no :class:`~sharify.SharingPlan`, ``init`` no str or ``inplace`` no bool.
    """
    check_model(model)
    if not isinstance(sharing, SharingPlan):
        raise TypeError(f"apply_plan expects a SharingPlan (from sharify.plan(model)), got {type(sharing).__name__}")
    check_flag("inplace", inplace)
    init = init or sharing.options.get("init", "average")
    method = sharing.options.get("method", "share")
    check_method_and_init(method, init)
    if not sharing.groups:
        raise NothingToShareError(sharing.empty_reason())
    _check_plan_fits(model, sharing)
    target = model if inplace else _deepcopy(model)
    edits = compute_edits(target, sharing, init)  # everything new is built before the first change to the model
    if isinstance(target, (nn.Sequential, nn.ModuleList)):
        warnings.warn(
            f"the root is an {type(target).__name__}: the store of shared tensors is appended as its last child "
            f"`{SHARED_STORE_NAME}` (an identity in forward), so len(model) and model[-1] change",
            stacklevel=2,
        )
    apply_edits(target, edits)
    return target


def unshare(model: ModelT, *, inplace: bool = False) -> ModelT:
    """Materialises independent convs again: each member gets its own copy of its group's tensors.

    Use it before exporters that need plain convs (TorchScript). Every store is removed, also those of
    submodules sharified on their own (``sharify(det.backbone.body, inplace=True)``), so the result
    has the original's state_dict keys. A model without shared convs is returned unchanged (copied
    unless ``inplace``).

    Args:
        model: The sharified model (not a DDP / DataParallel / ``torch.compile`` wrapper).
        inplace: Rewrite ``model`` itself instead of a deep copy.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``inplace`` is not a bool.
        UnsupportedModelError: ``model`` is a wrapper: unshare the bare model, then wrap the result.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unshare expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if is_wrapper(model):
        raise UnsupportedModelError(
            f"got a {type(model).__name__} wrapper; unshare the bare model and wrap the result "
            "(plain = sharify.unshare(wrapped.module)), because the wrapper has already captured the shared parameters"
        )
    target = model if inplace else copy.deepcopy(model)
    for _, module in list(target.named_modules()):
        if is_shared_conv(module):
            detach_from_holder(module)
    for _, module in list(target.named_modules()):
        if isinstance(module._modules.get(SHARED_STORE_NAME), SharedStore):
            del module._modules[SHARED_STORE_NAME]
    return target
