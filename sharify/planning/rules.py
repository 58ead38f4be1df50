"""The sharing rule: conv signatures, position selectors, groups and their parameter arithmetic.

Given the stages found by :mod:`sharify.analysis.residual`, a group is the set of convs of one stage picked by
one position selector that have one :class:`ConvSignature`; :class:`SharingGroup` knows what sharing
it (whole conv or filter basis) saves. :mod:`sharify.planning.plan` applies these rules to a traced model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._paths import within
from ..analysis.channels import ChannelSlot
from ..analysis.residual import Block, Stage
from .options import _ALIASES, Rank, Selector, SharingOptions

__all__ = [
    "ConvSignature",
    "SharingGroup",
    "basis_ranks",
    "check_delta_keys",
    "check_rank_stages",
    "delta_rank_of",
    "delta_size",
    "group_key",
    "is_depthwise",
    "is_spatial",
    "scaled_rank",
    "select",
    "select_linear",
]


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
    def of(cls, conv: nn.Module) -> ConvSignature:
        """The signature of a conv, or of an ``nn.Linear`` (``in_features -> out_features``, no kernel)."""
        if isinstance(conv, nn.Linear):
            return cls(
                kind=f"{type(conv).__module__}.{type(conv).__qualname__}",
                in_channels=conv.in_features,
                out_channels=conv.out_features,
                kernel_size=(),
                stride=(),
                padding=(),
                dilation=(),
                groups=1,
                bias=conv.bias is not None,
                padding_mode="",
                dtype=str(conv.weight.dtype).removeprefix("torch."),
            )
        assert isinstance(conv, nn.Conv2d)
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

    @property
    def linear(self) -> bool:
        """Whether the members are ``nn.Linear`` layers (no kernel)."""
        return not self.kernel_size

    def __str__(self) -> str:
        if self.linear:
            return f"{self.in_channels}->{self.out_channels} linear{' +bias' if self.bias else ''}"
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
        slots: With ``align=True``: per member, its free ``(input, output)`` channels
            (:class:`~sharify.analysis.channels.ChannelSlot` or ``None``), which the rewrite permutes to align
            the members.
        gains: Parameters ``init="scaled"`` adds as per-channel gains of members without such a
            BatchNorm (0 otherwise).
        delta_rank: Rank of each member's low-rank delta (relaxed sharing; 0: none).
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
    slots: tuple[tuple[ChannelSlot | None, ChannelSlot | None], ...] = ()
    gains: int = 0
    delta_rank: int = 0

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
    def row_size(self) -> int:
        """Elements of one output channel's filter: ``in/groups * kh * kw`` (the weight viewed as ``(out, d)``)."""
        return self.weight_numel // self.signature.out_channels

    @property
    def max_delta_rank(self) -> int:
        """The rank of ``delta_rank="full"``: ``min(out, in/groups * kh * kw)``."""
        return min(self.signature.out_channels, self.row_size)

    @property
    def member_size(self) -> int:
        """Parameters each member keeps for itself: none, its low-rank delta (``r * (out + d)``, plus ``out``
        with a bias), or its unique basis, BatchNorm and 1x1 coefficients."""
        if self.method != "basis":
            return delta_size(self.delta_rank, self.signature.out_channels, self.row_size, self.bias_numel)
        rank = self.shared_rank + self.unique_rank
        unique = self.unique_rank * self.weight_numel // self.signature.out_channels
        return unique + 2 * rank + rank * self.signature.out_channels + self.bias_numel

    @property
    def params_saved(self) -> int:
        """What the group saves: ``(n - 1) * size`` for sharing; for a basis, the members' convs minus
        the shared basis and each member's unique basis, BatchNorm and coefficients."""
        n = len(self.members)
        return n * self.size - self.shared_size - n * self.member_size - self.gains


def delta_size(rank: int, out: int, row: int, bias_numel: int) -> int:
    """Parameters of one member's low-rank delta of rank ``rank``: ``rank * (out + row)``, plus its bias delta
    (``bias_numel``) when ``rank > 0``."""
    return rank * (out + row) + (bias_numel if rank else 0)


def delta_rank_of(rank: Any, stage: str, key: str, out: int, row: int) -> int:
    """The delta rank of a group (key ``key`` in stage ``stage``) of convs with ``out`` outputs and ``row``
    elements per filter, given the ``delta_rank`` option ``rank``: the group's own entry of a mapping, else its
    stage's, else 0; ``"full"`` and ranks above ``min(out, row)`` are ``min(out, row)``."""
    if isinstance(rank, Mapping):
        rank = rank.get(key, rank.get(stage, 0))
    full = min(out, row)
    return full if rank == "full" else min(int(rank), full)


def check_delta_keys(options: SharingOptions, stages: Sequence[str], keys: Sequence[str]) -> None:
    """Refuses a ``delta_rank`` mapping with keys that are neither a stage path nor a group key of the plan."""
    rank = options.delta_rank
    if not isinstance(rank, Mapping):
        return
    unknown = [k for k in rank if k not in stages and k not in keys]
    if unknown:
        raise ValueError(
            f"delta_rank has entries for {', '.join(map(repr, unknown))}, which are neither stage paths nor group "
            f"keys of this model; stage paths: {_stage_list(stages)}; group keys: "
            f"{', '.join(map(repr, keys)) or '(none)'}"
        )


def is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def is_spatial(conv: nn.Conv2d) -> bool:
    return any(k > 1 for k in conv.kernel_size)


def select_linear(block: Block, selector: str) -> list[tuple[str, str]]:
    """``(position label, Linear path)`` picked by a Linear selector (``"attn"``, ``"mlp"``, ``"all_linear"``) in one
    block: every Linear of its branch when the branch is of the selected kind (attention or not), labelled by its
    index in the branch (``attn0`` is a ViT's qkv, ``attn1`` its output projection; ``mlp0``/``mlp1`` fc1/fc2)."""
    kind = "attn" if block.attention else "mlp"
    if selector not in (kind, "all_linear"):
        return []
    return [(f"{kind}{i}", path) for i, path in enumerate(block.linears)]


def select(convs: Sequence[tuple[str, nn.Conv2d]], selector: Selector, depthwise: bool) -> list[tuple[str, str]]:
    """``(position label, conv path)`` picked by ``selector`` in one block's branch convs.

    ``"first"``, ``"last"`` and integers index ``convs`` (the block's eligible branch convs, whole list);
    an index out of range picks nothing in this block.
    """

    def ok(conv: nn.Conv2d) -> bool:
        return depthwise or not is_depthwise(conv)

    if selector == "last_spatial":
        spatial = [p for p, c in convs if is_spatial(c) and ok(c)]
        return [("last_spatial", spatial[-1])] if spatial else []
    if selector == "all_spatial":
        return [(f"spatial{i}", p) for i, p in enumerate(p for p, c in convs if is_spatial(c) and ok(c))]
    index = _ALIASES.get(selector, selector) if isinstance(selector, str) else selector
    assert isinstance(index, int)
    if -len(convs) <= index < len(convs) and ok(convs[index][1]):
        return [(str(selector), convs[index][0])]
    return []


def group_key(stage: Stage, unique_stage_path: bool, block: Block, member: str, label: str, taken: set[str]) -> str:
    """Deterministic holder key: ``<stage>.<member path inside its block>`` (e.g. ``layer1.conv2``),
    or the first member's own path when the stage's path does not identify the stage."""
    if unique_stage_path and within(member, block.path) and member != block.path:
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


def scaled_rank(rank: int, channels: int) -> int:
    """Filters for ``rank`` per 64 channels in a conv with ``channels`` outputs (the paper's ``m = C/64``).

    ``max(1, floor(rank * channels / 64 + 1/2))``: rounded half up (``2.5 -> 3``, never banker's
    rounding) in exact integer arithmetic, and at least one filter.
    """
    return max(1, (2 * rank * channels + 64) // 128)


def basis_ranks(
    options: SharingOptions, stage: str, sig: ConvSignature, member: str, stages: Sequence[str] = ()
) -> tuple[int, int]:
    """Effective (shared, unique) filter counts of a basis group, checked against the layer.

    Args:
        options: The resolved options (``method="basis"``).
        stage: Path of the group's stage (the key into per-stage rank mappings).
        sig: The members' signature.
        member: Path of the first member (for messages).
        stages: Paths of all stages that can hold groups (for messages).
    """
    if sig.linear:
        raise ValueError(
            f"method='basis' replaces dense 3x3 convs, but position {member!r} holds an nn.Linear; share Linear layers "
            "whole (method='share', optionally with delta_rank or param_budget)"
        )
    if sig.kernel_size != (3, 3) or sig.groups != 1:
        raise ValueError(
            f"method='basis' replaces dense 3x3 convs, but position {member!r} holds a "
            f"{'x'.join(map(str, sig.kernel_size))} conv with groups={sig.groups}; choose positions that pick "
            "3x3 convs, e.g. positions=('all_spatial',) or ('last_spatial',)"
        )

    def effective(name: str, rank: Rank | None) -> int:
        if isinstance(rank, Mapping):
            if stage not in rank:
                unknown = [k for k in rank if k not in stages]
                extra = f" (its keys {', '.join(map(repr, unknown))} are no stage paths)" if unknown else ""
                raise ValueError(
                    f"{name} has no entry for stage {stage!r}{extra}; give one int per stage path: "
                    f"{_stage_list(stages)}"
                )
            return int(rank[stage])
        assert rank is not None  # SharingOptions requires both ranks with method="basis"
        return scaled_rank(rank, sig.out_channels)

    s, u = effective("shared_rank", options.shared_rank), effective("unique_rank", options.unique_rank)
    dim = sig.in_channels * 9
    if s + u > dim:
        raise ValueError(
            f"shared_rank + unique_rank = {s} + {u} filters exceeds what `{member}` allows: its filters live in a "
            f"{dim}-dimensional space (in_channels * 3 * 3); use at most {dim} filters in total"
        )
    return s, u


def check_rank_stages(options: SharingOptions, stages: Sequence[str]) -> None:
    """Refuses per-stage rank mappings with keys that are not the path of a stage that can hold groups."""
    for name in ("shared_rank", "unique_rank"):
        rank = getattr(options, name)
        if not isinstance(rank, Mapping):
            continue
        unknown = [k for k in rank if k not in stages]
        if unknown:
            raise ValueError(
                f"{name} has entries for {', '.join(map(repr, unknown))}, which are no stage paths of this model; "
                f"valid stage paths: {_stage_list(stages)}"
            )


def _stage_list(stages: Sequence[str]) -> str:
    return ", ".join(repr(s) for s in dict.fromkeys(stages)) or "(none: the model has no multi-block stage)"
