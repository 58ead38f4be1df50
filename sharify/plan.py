"""What would be shared: stages, sharing groups and their parameter arithmetic. Analysis only.

:func:`plan` traces the model, propagates shapes with fake tensors, finds residual stages
(:mod:`sharify.residual`) and applies the sharing rule: in every block of a stage, the conv(s) picked
by each *position selector*; members of a stage and position with one conv signature form a group;
groups of one are left alone. Nothing in the model changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from .options import Rank, Selector, SharingOptions, resolve_options
from .residual import Block, Stage, find_stages
from .shapes import propagate_shapes
from .tracing import LeafSpec, trace

__all__ = ["ConvSignature", "SharingGroup", "SharingPlan", "make_plan", "plan"]


@dataclass(frozen=True)
class ConvSignature:
    """Everything that must agree for two convs to share one weight."""

    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    dtype: str

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvSignature:
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(
            kind=f"{type(conv).__module__}.{type(conv).__qualname__}",
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=padding,
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            dtype=str(conv.weight.dtype).removeprefix("torch."),
        )

    def __str__(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        s = "x".join(map(str, self.stride))
        g = f" g{self.groups}" if self.groups > 1 else ""
        b = " +bias" if self.bias else ""
        return f"{self.in_channels}->{self.out_channels} {k} s{s}{g}{b}"


@dataclass(frozen=True)
class SharingGroup:
    """Convs that will share one weight (and bias).

    Attributes:
        key: Where the shared tensors live: ``model.sharify_shared.<key>``.
        stage: Module path of the stage.
        position: The selector position the members were picked by.
        signature: The members' common conv signature.
        members: Module paths of the member convs, in execution order.
        weight_numel: Elements of the shared weight.
        bias_numel: Elements of the shared bias (0 without bias).
        method: ``"share"`` (one shared weight) or ``"basis"`` (a shared filter basis).
        shared_rank: Filters of the shared basis (``"basis"`` only).
        unique_rank: Filters of each member's own basis (``"basis"`` only).
        norms: Per member, the path of the BatchNorm that alone consumes its output (``None`` if
            there is none); ``init="scaled"`` folds the member's gains into it.
        gains: Parameters ``init="scaled"`` adds as per-channel gains of members without such a
            BatchNorm (0 otherwise).
    """

    key: str
    stage: str
    position: str
    signature: ConvSignature
    members: tuple[str, ...]
    weight_numel: int
    bias_numel: int
    method: str = "share"
    shared_rank: int = 0
    unique_rank: int = 0
    norms: tuple[str | None, ...] = ()
    gains: int = 0

    @property
    def size(self) -> int:
        """Parameters of one member conv (weight + bias)."""
        return self.weight_numel + self.bias_numel

    @property
    def shared_size(self) -> int:
        """Parameters owned once by the group: the shared weight and bias, or the shared basis."""
        if self.method == "basis":
            return self.shared_rank * self.weight_numel // self.signature.out_channels
        return self.size

    @property
    def member_size(self) -> int:
        """Parameters each member keeps for itself: none, or its unique basis, BatchNorm and 1x1 coefficients."""
        if self.method != "basis":
            return 0
        rank = self.shared_rank + self.unique_rank
        unique = self.unique_rank * self.weight_numel // self.signature.out_channels
        return unique + 2 * rank + rank * self.signature.out_channels + self.bias_numel

    @property
    def params_saved(self) -> int:
        """What the group saves: ``(n - 1) * size`` for sharing; for a basis, the members' convs minus
        the shared basis and each member's unique basis, BatchNorm and coefficients."""
        n = len(self.members)
        return n * self.size - self.shared_size - n * self.member_size - self.gains


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
        notes: Remarks on the analysis: where shape propagation stopped, why candidates were left out.
        convs_without_shape: Conv calls that shape propagation could not reach (their stages were
            not analysed; ``sharify`` warns when this is not 0).
    """

    model: str
    stages: tuple[Stage, ...]
    groups: tuple[SharingGroup, ...]
    params_before: int
    options: dict[str, Any]
    auto_leaves: dict[str, str] = field(default_factory=dict)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    notes: tuple[str, ...] = ()
    convs_without_shape: int = 0

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
        if not self.stages:
            why = (
                f"no residual blocks found in {self.model} (no addition of a conv branch to a same-shaped shortcut); "
                "sharify shares convs between the residual blocks of a stage"
            )
        elif all(len(s.blocks) < 2 for s in self.stages):
            why = f"residual blocks found in {self.model}, but no stage has two consecutive blocks of one output shape"
        else:
            why = (
                f"residual blocks found in {self.model}, but no two convs picked by positions="
                f"{self.options['positions']!r} with the same signature in a stage"
            )
        hints = list(self.notes)
        if self.auto_leaves:
            hints.append(
                "these submodules could not be traced and were not analysed: "
                + ", ".join(f"`{p}` ({r})" for p, r in self.auto_leaves.items())
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
            "auto_leaves": self.auto_leaves,
            "notes": list(self.notes),
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
        if not self.groups:
            lines.append(f"  nothing to share: {self.empty_reason()}")
        for path, reason in self.auto_leaves.items():
            lines.append(f"  not traced (treated as a leaf): {path}: {reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def is_spatial(conv: nn.Conv2d) -> bool:
    return any(k > 1 for k in conv.kernel_size)


def _select(convs: Sequence[tuple[str, nn.Conv2d]], selector: Selector, depthwise: bool) -> list[tuple[str, str]]:
    """``(position label, conv path)`` picked by ``selector`` in one block's branch convs."""

    def ok(conv: nn.Conv2d) -> bool:
        return depthwise or not is_depthwise(conv)

    if selector == "last_spatial":
        spatial = [p for p, c in convs if is_spatial(c) and ok(c)]
        return [("last_spatial", spatial[-1])] if spatial else []
    if selector == "all_spatial":
        return [(f"spatial{i}", p) for i, p in enumerate(p for p, c in convs if is_spatial(c) and ok(c))]
    index = {"first": 0, "last": -1}.get(selector, selector) if isinstance(selector, str) else selector
    assert isinstance(index, int)
    if -len(convs) <= index < len(convs) and ok(convs[index][1]):
        return [(str(selector), convs[index][0])]
    return []


def _group_key(stage: Stage, unique_stage_path: bool, block: Block, member: str, label: str, taken: set[str]) -> str:
    """Deterministic holder key: ``<stage>.<member path inside its block>`` (e.g. ``layer1.conv2``),
    or the first member's own path when the stage's path does not identify the stage."""
    if unique_stage_path and _within(member, block.path) and member != block.path:
        rel = member[len(block.path) + 1 :] if block.path else member
        base = ".".join(x for x in (stage.path, rel) if x)
    elif unique_stage_path and member == block.path:
        base = ".".join(x for x in (stage.path, label) if x)
    else:
        base = member
    key, n = base, 1

    def clashes(k: str) -> bool:
        return any(k == t or k.startswith(t + ".") or t.startswith(k + ".") for t in taken)

    while clashes(key):
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


def _within(path: str, ancestor: str) -> bool:
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


def plan(
    model: nn.Module,
    *,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    preset: str | None = None,
    positions: Sequence[Selector] | Selector | None = None,
    skip_first_block: bool | None = None,
    depthwise: bool | None = None,
    method: str | None = None,
    shared_rank: Rank | None = None,
    unique_rank: Rank | None = None,
    init: str | None = None,
    leaf_modules: LeafSpec | None = None,
) -> SharingPlan:
    """Analyses ``model`` and returns what :func:`sharify.sharify` would share. Changes nothing.

    Options left as ``None`` take the preset's value, else the default shown.

    Args:
        model: Any ``nn.Module`` built of residual blocks.
        example_inputs: Inputs for shape propagation; default ``(1, C, H, W)`` from timm's
            ``pretrained_cfg["input_size"]`` or 3x224x224, C from the first conv.
        preset: A named variant of the papers (:data:`sharify.options.PRESETS`), e.g. ``"dsfb-shared++"``.
        positions: Which conv(s) of each block's residual branch to share, each selector forming
            its own groups: ``"last_spatial"`` (default, ShaResNet), ``"all_spatial"``, ``"first"``,
            ``"last"`` or an index into the branch's convs.
        skip_first_block: Leave each stage's first block out (default ``False``; the paper's WRN rows
            and DSFB leave it out).
        depthwise: Let depthwise convs be members (default ``False``).
        method: ``"share"`` (default): members share one weight; ``"basis"``: each member becomes
            unique basis + shared basis -> BatchNorm -> 1x1 coefficients (Deeply Shared Filter Bases).
        shared_rank: ``method="basis"``: shared basis filters per 64 channels (or ``{stage: filters}``).
        unique_rank: ``method="basis"``: unique basis filters per 64 channels (or ``{stage: filters}``).
        init: The init :func:`sharify.sharify` will use; only ``"scaled"`` changes the arithmetic
            (members with no BatchNorm after them get per-channel gains).
        leaf_modules: Module classes or paths not to trace into.

    Returns:
        The plan; ``plan.groups`` is empty when nothing can be shared (``plan.empty_reason()`` says why).

    Raises:
        ValueError: Unknown preset/selector/method, bad ranks, or ``method="basis"`` on a position
            that is not a dense 3x3 conv.

    Example:
        >>> import torchvision, sharify
        >>> p = sharify.plan(torchvision.models.resnet34())
        >>> [g.key for g in p.groups]
        ['layer1.conv2', 'layer2.conv2', 'layer3.conv2', 'layer4.conv2']
        >>> sharify.plan(torchvision.models.resnet50(), preset="dsfb-shared++").params_after
        18262056
    """
    options = resolve_options(
        preset,
        positions=positions,
        skip_first_block=skip_first_block,
        depthwise=depthwise,
        method=method,
        shared_rank=shared_rank,
        unique_rank=unique_rank,
        init=init,
    )
    return make_plan(model, options, example_inputs=example_inputs, leaf_modules=leaf_modules)


def _basis_ranks(options: SharingOptions, stage: str, sig: ConvSignature, member: str) -> tuple[int, int]:
    """Effective (shared, unique) filter counts of a basis group, checked against the layer."""
    if sig.kernel_size != (3, 3) or sig.groups != 1:
        raise ValueError(
            f"method='basis' replaces dense 3x3 convs, but position {member!r} holds a "
            f"{'x'.join(map(str, sig.kernel_size))} conv with groups={sig.groups}; choose positions that pick "
            "3x3 convs, e.g. positions=('all_spatial',) or ('last_spatial',)"
        )

    def effective(name: str, rank: Rank | None) -> int:
        if isinstance(rank, Mapping):
            if stage not in rank:
                raise ValueError(f"{name} has no entry for stage {stage!r}; stages: give one int per stage path")
            return int(rank[stage])
        assert rank is not None
        return max(1, round(rank * sig.out_channels / 64))

    s, u = effective("shared_rank", options.shared_rank), effective("unique_rank", options.unique_rank)
    dim = sig.in_channels * 9
    if s + u > dim:
        raise ValueError(
            f"shared_rank + unique_rank = {s} + {u} filters exceeds what `{member}` allows: its filters live in a "
            f"{dim}-dimensional space (in_channels * 3 * 3); use at most {dim} filters in total"
        )
    return s, u


def make_plan(
    model: nn.Module,
    options: SharingOptions,
    *,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    leaf_modules: LeafSpec | None = None,
) -> SharingPlan:
    """:func:`plan` with already resolved :class:`~sharify.options.SharingOptions`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan expects a torch.nn.Module, got {type(model).__name__}")
    traced = trace(model, leaf_modules)
    shapes = propagate_shapes(model, traced.graph, example_inputs)
    _, stages = find_stages(traced.graph, model)
    modules = dict(model.named_modules())

    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1

    def eligible(path: str) -> bool:
        conv = modules[path]
        return calls.get(path) == 1 and all(owners.get(id(p), 0) == 1 for p in conv.parameters(recurse=False))

    conv_nodes = {str(n.target): n for n in traced.graph.nodes if n.op == "call_module"}

    def following_norm(path: str) -> str | None:
        users = list(conv_nodes[path].users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        norm = modules.get(str(users[0].target))
        is_bn = isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.affine and norm.track_running_stats
        return str(users[0].target) if is_bn else None

    stage_paths = [s.path for s in stages if len(s.blocks) > 1]
    groups: list[SharingGroup] = []
    used: set[str] = set()
    taken: set[str] = set()
    saw_depthwise = False
    for stage in stages:
        if len(stage.blocks) < 2:
            continue
        blocks = [b for b in stage.blocks if not (options.skip_first_block and b is stage.first_block)]
        for selector in options.positions:
            by_position: dict[tuple[str, ConvSignature], list[tuple[Block, str]]] = {}
            for block in blocks:
                convs = [(p, modules[p]) for p in block.convs if p not in used and eligible(p)]
                saw_depthwise |= any(is_depthwise(c) and is_spatial(c) for _, c in convs)
                for label, path in _select(convs, selector, options.depthwise):
                    sig = ConvSignature.of(modules[path])
                    by_position.setdefault((label, sig), []).append((block, path))
            for (label, sig), picked in by_position.items():
                if len(picked) < 2:
                    continue
                first_block, first_path = picked[0]
                conv = modules[first_path]
                ranks = _basis_ranks(options, stage.path, sig, first_path) if options.method == "basis" else (0, 0)
                norms = tuple(following_norm(p) for _, p in picked)
                used.update(p for _, p in picked)
                groups.append(
                    SharingGroup(
                        key=_group_key(
                            stage, stage_paths.count(stage.path) == 1, first_block, first_path, label, taken
                        ),
                        stage=stage.path,
                        position=label,
                        signature=sig,
                        members=tuple(p for _, p in picked),
                        weight_numel=conv.weight.numel(),
                        bias_numel=0 if conv.bias is None else conv.bias.numel(),
                        method=options.method,
                        shared_rank=ranks[0],
                        unique_rank=ranks[1],
                        norms=norms,
                        gains=sig.out_channels * norms.count(None) if options.init == "scaled" else 0,
                    )
                )

    notes = []
    if shapes.failure is not None:
        lost = (
            f"; {shapes.convs_without_shape} conv calls after it were not analysed"
            if shapes.convs_without_shape
            else ""
        )
        notes.append(f"shape propagation stopped at {shapes.failure}{lost}")
    if not groups and saw_depthwise and not options.depthwise:
        notes.append("the residual branches hold depthwise spatial convs, which are only shared with depthwise=True")
    if not groups and options.skip_first_block:
        notes.append("skip_first_block=True left each stage's first block out; try skip_first_block=False")
    return SharingPlan(
        model=type(model).__name__,
        stages=tuple(stages),
        groups=tuple(groups),
        params_before=count_params(model),
        options=options.to_dict(),
        auto_leaves=traced.auto_leaves,
        input_shapes=tuple(tuple(x.shape) for x in shapes.inputs),
        convs_without_shape=shapes.convs_without_shape,
        notes=tuple(notes),
    )
