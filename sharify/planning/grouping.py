"""The sharing rule applied to a model's stages: which convs form groups, and what to try when none do.

:class:`GroupFinder` holds what the rule needs of one traced model (its modules, how often each is
called, which BatchNorm follows each conv) and forms the groups for any :class:`SharingOptions`, so a
refusal can try the other options and suggest only those that would share something.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from torch import fx, nn
from torch.nn.utils import parametrize

from .._paths import module_paths, names_by_identity
from ..analysis.channels import channel_slots
from ..analysis.residual import Block, Stage
from .options import _ALIASES, LINEAR_SELECTORS, Selector, SharingOptions
from .rules import (
    ConvSignature,
    SharingGroup,
    basis_ranks,
    delta_rank_of,
    group_key,
    is_depthwise,
    is_spatial,
    select,
    select_linear,
)

__all__ = ["GroupFinder", "Seen", "check_indices", "computed_tensor_reason", "nothing_to_share_hints"]


@dataclass
class Seen:
    """What the branches of the multi-block stages held, for the reasons of an empty plan.

    Attributes:
        depthwise / spatial / pointwise: Whether some free eligible branch conv is of that kind.
        linear: Whether some branch holds a free eligible ``nn.Linear`` (a transformer's or MLP block's).
        reused: Whether some branch conv is called more than once, holds tied parameters or computes its weight.
        branch_lengths: Convs per branch considered (for the range check of index selectors).
        skipped: Convs a selector picked that cannot be members, by path: why, and the selector's label.
    """

    depthwise: bool = False
    spatial: bool = False
    pointwise: bool = False
    linear: bool = False
    reused: bool = False
    branch_lengths: list[int] = field(default_factory=list)
    skipped: dict[str, tuple[str, str]] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """The convs selectors picked and left out, named with the reason (one note per reason and selector)."""
        by_reason: dict[tuple[str, str], list[str]] = {}
        for path, why in self.skipped.items():
            by_reason.setdefault(why, []).append(path)
        notes = []
        for (reason, label), paths in by_reason.items():
            names = ", ".join(f"`{p}`" for p in paths)
            one = len(paths) == 1
            notes.append(
                f"{names} (picked by {label!r}) {'is' if one else 'are'} not shared: {reason}; nothing is shared in "
                f"{'its' if one else 'their'} place"
            )
        return notes


def _runs(picked: list[tuple[Block, str]], size: int) -> list[list[tuple[Block, str]]]:
    """The members of a stage's position split into runs of ``size`` consecutive ones (``0``: one run), those of
    two or more members: the groups they form."""
    runs = [picked[i : i + size] for i in range(0, len(picked), size)] if size else [picked]
    return [r for r in runs if len(r) > 1]


class GroupFinder:
    """Forms the sharing groups of one traced model's stages.

    Args:
        model: The traced model.
        graph: Its graph (calls are counted there: a conv called twice is never a member).
        stages: Its residual stages, in execution order.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, stages: Sequence[Stage]) -> None:
        self.modules = dict(model.named_modules())
        self.stages = list(stages)
        self.stage_paths = [s.path for s in stages if len(s.blocks) > 1]
        self.calls: dict[str, int] = {}
        self.conv_nodes: dict[str, fx.Node] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
                self.conv_nodes[str(node.target)] = node
        self.param_names = names_by_identity(model.named_parameters(remove_duplicate=False))
        self.module_paths = module_paths(model)
        self._reasons: dict[str, str | None] = {}

    def eligible(self, path: str) -> bool:
        """A conv called once per forward whose own plain parameters no other module holds."""
        return self.ineligible_reason(path) is None

    def ineligible_reason(self, path: str) -> str | None:
        """Why the conv at ``path`` cannot be a member (``None`` if it can)."""
        if path not in self._reasons:
            self._reasons[path] = self._ineligible_reason(path)
        return self._reasons[path]

    def _ineligible_reason(self, path: str) -> str | None:
        conv = self.modules[path]
        calls = self.calls.get(path, 0)
        if calls > 1:
            return f"it is called {calls} times per forward (one module used by several blocks: already shared)"
        computed = computed_tensor_reason(conv)
        if computed is not None:
            return computed
        own = {f"{alias}.{name}" for alias in self.module_paths.get(id(conv), [path]) for name in conv._parameters}
        for name, p in conv.named_parameters(recurse=False):  # an alias of the module itself (called once) is fine
            tied = [n for n in self.param_names.get(id(p), []) if n not in own]
            if tied:
                return f"its {name} is the same Parameter as `{tied[0]}` (tied by the model: already shared)"
        return None

    def following_norm(self, path: str) -> str | None:
        """The affine BatchNorm with running statistics that alone consumes the conv's output, if any."""
        users = list(self.conv_nodes[path].users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        norm = self.modules.get(str(users[0].target))
        is_bn = isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.affine and norm.track_running_stats
        return str(users[0].target) if is_bn else None

    def groups(self, options: SharingOptions) -> tuple[list[SharingGroup], Seen]:
        """The groups ``options`` form, and what the branches held."""
        seen = Seen()
        groups: list[SharingGroup] = []
        used: set[str] = set()
        taken: set[str] = set()
        for stage in self.stages:
            if len(stage.blocks) < 2:
                continue
            blocks = [b for b in stage.blocks if not (options.skip_first_block and b is stage.first_block)]
            for selector in options.positions:
                by_position: dict[tuple[str, ConvSignature], list[tuple[Block, str]]] = {}
                for block in blocks:
                    # Every selector indexes the block's full list of branch convs; a conv already in a group (of an
                    # earlier selector, or of an earlier stage) or one that cannot be a member (called twice, tied,
                    # parametrized) is skipped, never replaced by another conv.
                    convs = [(p, self.modules[p]) for p in block.convs]
                    seen.branch_lengths.append(len(convs))
                    free = [c for p, c in convs if p not in used and self.eligible(p)]
                    seen.reused |= any(p not in used and not self.eligible(p) for p in block.convs)
                    seen.depthwise |= any(is_depthwise(c) and is_spatial(c) for c in free)
                    seen.spatial |= any(is_spatial(c) for c in free)
                    seen.pointwise |= any(not is_spatial(c) for c in free)
                    seen.linear |= any(p not in used and self.eligible(p) for p in block.linears)
                    picks = (
                        select_linear(block, selector)
                        if selector in LINEAR_SELECTORS
                        else select(convs, selector, options.depthwise)
                    )
                    for label, path in picks:
                        reason = self.ineligible_reason(path)
                        if reason is not None:
                            seen.skipped.setdefault(path, (reason, label))
                        elif path not in used:
                            sig = ConvSignature.of(self.modules[path])
                            by_position.setdefault((label, sig), []).append((block, path))
                for (label, sig), picked in by_position.items():
                    for run in _runs(picked, options.group_size):
                        used.update(p for _, p in run)
                        groups.append(self._group(stage, label, sig, run, options, taken))
        return groups, seen

    def _group(
        self,
        stage: Stage,
        label: str,
        sig: ConvSignature,
        picked: list[tuple[Block, str]],
        options: SharingOptions,
        taken: set[str],
    ) -> SharingGroup:
        first_block, first_path = picked[0]
        conv = self.modules[first_path]
        assert isinstance(conv, (nn.Conv2d, nn.Linear))
        ranks = (
            basis_ranks(options, stage.path, sig, first_path, self.stage_paths) if options.method == "basis" else (0, 0)
        )
        norms = tuple(self.following_norm(p) for _, p in picked)
        slots = (
            tuple(channel_slots(self.conv_nodes[p], self.modules, self.calls) for _, p in picked)
            if options.align
            else ()
        )
        unique_stage = self.stage_paths.count(stage.path) == 1
        key = group_key(stage, unique_stage and not options.group_size, first_block, first_path, label, taken)
        row = conv.weight.numel() // sig.out_channels
        delta = (
            delta_rank_of(options.delta_rank, stage.path, key, sig.out_channels, row)
            if options.method == "share"
            else 0
        )
        return SharingGroup(
            key=key,
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
            slots=slots,
            gains=sig.out_channels * norms.count(None) if options.init == "scaled" else 0,
            delta_rank=delta,
        )

    def would_share(self, options: SharingOptions, **changes: Any) -> list[SharingGroup]:
        """The groups whole-conv sharing would form with ``changes`` applied to ``options``."""
        trial = dataclasses.replace(
            options, method="share", shared_rank=None, unique_rank=None, init="average", align=False, delta_rank=0,
            param_budget=None, **changes,
        )  # fmt: skip
        return self.groups(trial)[0]


def nothing_to_share_hints(options: SharingOptions, seen: Seen, finder: GroupFinder) -> list[str]:
    """Why ``options`` formed no group although some stage has several blocks, and what would share.

    Every option suggested is one that :meth:`GroupFinder.would_share` confirms forms a group on this
    model; when none does, the last hint says the architecture has nothing ShaResNet-style to share.
    """
    notes: list[str] = []
    suggested = False
    if seen.depthwise and not options.depthwise and finder.would_share(options, depthwise=True):
        notes.append("the residual branches hold depthwise spatial convs, which are only shared with depthwise=True")
        suggested = True
    spatial_only = all(p in ("last_spatial", "all_spatial") for p in options.positions)
    if seen.pointwise and not seen.spatial and spatial_only and finder.would_share(options, positions=("last",)):
        notes.append(
            "the residual branches hold only pointwise (1x1) convs, which positions="
            f"{list(options.positions)!r} does not pick; positions=['last'] shares the last conv of each branch"
        )
        suggested = True
    linear_only = not any(p in LINEAR_SELECTORS for p in options.positions)
    if seen.linear and linear_only and finder.would_share(options, positions=("all_linear",)):
        notes.append(
            "the residual branches hold nn.Linear layers (transformer or MLP blocks), which conv selectors do not "
            "pick: preset='minivit' shares them as MiniViT does (every Linear, runs of two consecutive blocks); "
            "positions=('all_linear',) shares each position across a whole stage ('attn' or 'mlp' for one kind)"
        )
        suggested = True
    if seen.reused:
        notes.append(
            "some branch convs are called more than once per forward, hold tied parameters (already shared) or "
            "compute their weight (parametrizations), so they are never members"
        )
    if options.skip_first_block and finder.would_share(options, skip_first_block=False):
        notes.append("skip_first_block=True left each stage's first block out; try skip_first_block=False")
        suggested = True
    if not suggested:
        notes.append(_other_positions(options, seen, finder))
    return notes


def _other_positions(options: SharingOptions, seen: Seen, finder: GroupFinder) -> str:
    """The other selectors that would form a group, if any."""
    tried = {_ALIASES.get(p, p) if isinstance(p, str) else p for p in options.positions}
    longest = max(seen.branch_lengths, default=0)
    found: dict[Selector, tuple[str, ...]] = {}
    for selector in ("all_spatial", "last", *range(longest)):
        same = _ALIASES.get(selector, selector) if isinstance(selector, str) else selector
        if same in tried:
            continue
        groups = finder.would_share(options, positions=(selector,))
        if groups:
            found[selector] = groups[0].members[:2]
    if not found:
        return (
            "no two blocks of a stage hold convs of one signature at the same position of their branches "
            "(channels, kernel, stride or groups differ), so this architecture has nothing ShaResNet-style to share"
        )
    tries = " or ".join(f"positions={s!r}" if isinstance(s, str) else f"positions=({s},)" for s in found)
    a, b = next(iter(found.values()))
    return f"{tries} would share convs of one signature (e.g. `{a}` and `{b}`)"


def check_indices(positions: Sequence[Selector], branch_lengths: list[int], model: str) -> None:
    """Refuses an integer position that is out of range in every residual branch considered.

    An index that fits only some branches (a stage of longer blocks) picks a conv in those and none in
    the others, like ``"last_spatial"`` in a branch without spatial convs.
    """
    if not branch_lengths:
        return  # no multi-block stage: the empty plan says why
    longest, shortest = max(branch_lengths), min(branch_lengths)
    for p in positions:
        if isinstance(p, int) and not -longest <= p < longest:
            have = f"{longest}" if shortest == longest else f"{shortest} to {longest}"
            every = f" ({-shortest}..{shortest - 1} pick a conv in every branch)" if 0 < shortest < longest else ""
            raise ValueError(
                f"position index {p} is out of range for every residual branch of {model}: the branches have "
                f"{have} convs, so valid indices are {-longest}..{longest - 1}{every}"
            )


def computed_tensor_reason(conv: nn.Module) -> str | None:
    """Why ``conv``'s weight or bias is not a plain Parameter of its own (a parametrization, ``weight_norm``'s
    hook, pruning), if it is not: sharing it would tie the tensors it is computed from, not the weight."""
    for name in ("weight", "bias"):
        value = conv._parameters.get(name)
        if isinstance(value, nn.Parameter) or (name in conv._parameters and value is None):
            continue
        if parametrize.is_parametrized(conv, name):
            chain = cast(nn.ModuleDict, conv.parametrizations)[name]
            kinds = ", ".join(type(p).__name__.lstrip("_") for p in cast(nn.ModuleList, chain))
            how = f"is parametrized ({kinds}, torch.nn.utils.parametrize)"
            fix = f"torch.nn.utils.parametrize.remove_parametrizations(conv, {name!r})"
        else:
            hooks = [h for h in conv._forward_pre_hooks.values() if getattr(h, "name", None) == name]
            origin = type(hooks[0]).__module__ if hooks else ""
            how = f"is computed in a forward pre-hook ({origin or 'not a Parameter'})"
            fix = _REMOVE_HOOK.get(origin, f"make conv.{name} an nn.Parameter")
        return f"the {name} {how}: sharing would tie the tensors it is computed from, not the {name}; {fix} shares it"
    return None


_REMOVE_HOOK = {
    "torch.nn.utils.weight_norm": "torch.nn.utils.remove_weight_norm(conv)",
    "torch.nn.utils.spectral_norm": "torch.nn.utils.remove_spectral_norm(conv)",
    "torch.nn.utils.prune": "torch.nn.utils.prune.remove(conv, 'weight')",
}
