"""Parameter report of a sharified model against its original: what sharing saved, and at what cost.

Per stage it gives the groups, members and the parameters of the shared convs before and after (with
the saving as a share of the whole model). Per group it gives the members, the size of the shared
tensor, the parameters before and after, and the relative dissimilarity of the original members to
what the shared model computes in their place,
``mean_i ||W_i - W_shared|| / ||W_i||``: the paper's question "how similar are the blocks?" answered
for the user's own weights (0 = identical; ``sqrt((n-1)/n)`` for the average of n independent random
tensors). For filter-basis groups ``W_shared`` is each block's effective conv (eval-mode BatchNorm
folded), so the column is the relative reconstruction error of the basis; for ``init="scaled"``
groups it is ``diag(a_i) W_shared`` with the member's per-channel gains. After ``align=True``, ``W_i``
has its channels in the order the alignment gave them (what the member's block computes with).

For deployment it also gives ``params_after_folding``: what remains once each BatchNorm is folded
into the conv before it by :func:`sharify.fold_batchnorm`, which keeps every shared tensor once. A member
followed by a BatchNorm (:mod:`sharify.analysis.folding`) then keeps a per-output-channel scale and bias where
torch's usual fusion keeps a bias, so it costs ``C_out`` more than the folded original; a filter-basis conv's
BatchNorm folds into its 1x1 coefficients, which saves its ``2 (s + u)`` parameters. The count is on the
basis of ``params_before``: the BatchNorm -> bias conversion of a conv, the same in the original and the
sharified model, is not counted, so ``params_before - params_after_folding`` is exactly what the folded
shared model saves against the original folded with torch's fusion (``fuse_conv_bn_eval``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from ._wrappers import unwrap
from .analysis.folding import bn_folded_members
from .deploy.batchnorm import basis_norm_foldable
from .errors import TieError
from .layers import SharedConvParams, is_shared_conv, scoped_key, shared_groups, shared_stores
from .planning.plan import count_params
from .rewrite.basis import BasisConv2d
from .rewrite.verify import verify

__all__ = ["GroupReport", "ParameterReport", "report"]


@dataclass(frozen=True)
class GroupReport:
    """One sharing group in a :class:`ParameterReport`."""

    key: str
    stage: str
    position: str
    members: tuple[str, ...]
    shape: tuple[int, ...]
    size: int
    params_before: int
    params_after: int
    dissimilarity: float | None
    #: Members whose output goes straight into a BatchNorm (``None``: the model could not be traced).
    folded: int | None = None
    #: Parameters after :func:`sharify.fold_batchnorm` (``None``: the model could not be traced): the shared
    #: tensor once, plus ``C_out`` for each folded member (its scale; its bias replaces the BatchNorm's as
    #: torch's fusion's does), minus the BatchNorms that filter-basis convs fold into their coefficients.
    params_after_folding: int | None = None
    #: Rank of the members' low-rank deltas (relaxed sharing; 0: none).
    delta_rank: int = 0
    #: Per member, the share of ``||W_i - W_shared||^2`` (gains applied) its delta recovers (``None``: no deltas,
    #: or the original's weights are not comparable).
    delta_captured: tuple[float, ...] | None = None

    @property
    def saved(self) -> int:
        return self.params_before - self.params_after


@dataclass(frozen=True)
class ParameterReport:
    """Parameters of an original and a sharified model, per stage and per sharing group.

    ``str(report)`` is two plain-text tables (stages, then groups with the model's total);
    :meth:`to_markdown` and :meth:`to_dict` give the same content as Markdown and JSON-ready data.
    """

    model: str
    params_before: int
    params_after: int
    groups: tuple[GroupReport, ...]
    #: Parameters left after :func:`sharify.fold_batchnorm`, on the basis of ``params_before`` (``None``: the
    #: model could not be traced; see the module docstring).
    params_after_folding: int | None = None

    @property
    def saved(self) -> int:
        return self.params_before - self.params_after

    @property
    def reduction(self) -> float:
        """Fraction of the original parameters saved."""
        return self.saved / self.params_before if self.params_before else 0.0

    @property
    def reduction_after_folding(self) -> float | None:
        """Fraction of the original parameters still saved after conv-BN folding (both models folded)."""
        if self.params_after_folding is None or not self.params_before:
            return None
        return (self.params_before - self.params_after_folding) / self.params_before

    def stages(self) -> dict[str, dict[str, int]]:
        """Per stage, in execution order: groups, members, parameters before/after (of the shared convs
        only) and saved."""
        out: dict[str, dict[str, int]] = {}
        for g in self.groups:
            s = out.setdefault(g.stage, dict.fromkeys(("groups", "members", "params_before", "params_after"), 0))
            s["groups"] += 1
            s["members"] += len(g.members)
            s["params_before"] += g.params_before
            s["params_after"] += g.params_after
        for s in out.values():
            s["saved"] = s["params_before"] - s["params_after"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "saved": self.saved,
            "reduction": self.reduction,
            "params_after_folding": self.params_after_folding,
            "reduction_after_folding": self.reduction_after_folding,
            "stages": self.stages(),
            "groups": [{**asdict(g), "saved": g.saved} for g in self.groups],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _of_model(self, saved: int) -> str:
        """``saved`` with its share of the model's parameters: ``5,087,232 (-19.9%)``."""
        share = saved / self.params_before if self.params_before else 0.0
        return f"{saved:,} ({-share:+.1%})"

    _STAGE_HEADER = ("stage", "groups", "members", "params before", "params after", "saved (of model)")

    def _stage_rows(self) -> list[list[str]]:
        return [
            [stage or "<root>", str(s["groups"]), str(s["members"]), f"{s['params_before']:,}",
             f"{s['params_after']:,}", self._of_model(s["saved"])]
            for stage, s in self.stages().items()
        ]  # fmt: skip

    _HEADER = ("group", "members", "weight", "params before", "params after", "saved", "dissimilarity")

    @property
    def _relaxed(self) -> bool:
        return any(g.delta_rank for g in self.groups)

    @property
    def _header(self) -> tuple[str, ...]:
        return (*self._HEADER, "delta rank: captured") if self._relaxed else self._HEADER

    def _rows(self) -> list[list[str]]:
        rows = []
        for g in self.groups:
            d = "-" if g.dissimilarity is None else f"{g.dissimilarity:.3f}"
            rows.append(
                [g.key, str(len(g.members)), "x".join(map(str, g.shape)), f"{g.params_before:,}",
                 f"{g.params_after:,}", f"{g.saved:,}", d]
            )  # fmt: skip
            if self._relaxed:
                share = "" if g.delta_captured is None else ": " + " ".join(f"{c:.0%}" for c in g.delta_captured)
                rows[-1].append(f"{g.delta_rank}{share}" if g.delta_rank else "-")
        rows.append(["total (model)", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
                     self._of_model(self.saved), "", *([""] if self._relaxed else [])])  # fmt: skip
        return rows

    @staticmethod
    def _text_table(header: tuple[str, ...], rows: list[list[str]], total: bool) -> list[str]:
        """Aligned columns (the first left-aligned), a rule under the header and above a total row."""
        table = [list(header), *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        rule = "  ".join("-" * w for w in widths)
        lines = []
        for i, r in enumerate(table):
            if total and i == len(table) - 1 and i > 1:
                lines.append(rule)
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0:
                lines.append(rule)
        return lines

    def __str__(self) -> str:
        """Two tables: per stage (the shared convs of each stage), then per group with the model's total."""
        lines = [f"{self.model}: {self.params_before:,} -> {self.params_after:,} parameters ({-self.reduction:+.1%})"]
        if self.groups:
            lines += [*self._text_table(self._STAGE_HEADER, self._stage_rows(), total=False), ""]
        lines += self._text_table(self._header, self._rows(), total=True)
        return "\n".join([*lines, *self._folding_lines()])

    def _folding_lines(self) -> list[str]:
        if self.params_after_folding is None or self.reduction_after_folding is None:
            return []
        folded = sum(g.folded or 0 for g in self.groups)
        if not folded:
            return []  # nothing to fold (a transformer's Linear members, convs followed by no BatchNorm)
        members = sum(len(g.members) for g in self.groups)
        return [
            f"after conv-BN folding (deployment): {self.params_after_folding:,} parameters "
            f"({-self.reduction_after_folding:+.1%}); {folded} of {members} shared convs feed a BatchNorm, "
            "folded into a per-member scale and bias (sharify.fold_batchnorm)"
        ]

    def to_markdown(self) -> str:
        """The tables of ``str(report)`` as Markdown (the stage table only when something is shared)."""

        def table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
            return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
                "| " + " | ".join(r) + " |" for r in rows
            ]

        lines = [*table(self._STAGE_HEADER, self._stage_rows()), ""] if self.groups else []
        lines += table(self._header, self._rows())
        folding = self._folding_lines()
        return "\n".join([*lines, "", *folding] if folding else lines)


Alignment = dict[str, dict[str, list[int]]]


def _original_weight(original: nn.Module, path: str, alignment: Alignment) -> torch.Tensor | None:
    """The original member's weight, its channels in the order ``align=True`` gave them (if it did)."""
    try:
        w = original.get_submodule(path).weight
    except AttributeError:
        return None
    if not isinstance(w, torch.Tensor) or w.is_meta:
        return None
    orders = alignment.get(path, {})
    for dim, side in ((1, "in"), (0, "out")):
        if side in orders:
            w = w.index_select(dim, torch.as_tensor(orders[side], device=w.device))
    return w


def _relative_error(
    original: nn.Module, members: list[str], computed: list[torch.Tensor], alignment: Alignment
) -> float | None:
    """``mean_i ||W_i - computed_i|| / ||W_i||`` over the original members' weights."""
    values = []
    with torch.no_grad():
        for path, c in zip(members, computed):
            w = _original_weight(original, path, alignment)
            if w is None or c.is_meta or w.shape != c.shape:
                return None
            norm = w.float().norm().item()
            values.append((w.float() - c.float()).norm().item() / norm if norm else math.nan)
    return sum(values) / len(values) if values else None


def _with_best_gains(original: nn.Module, path: str, shared: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """``diag(a) W`` with the least-squares per-channel gains ``a`` of the original member (the gains
    ``init="scaled"`` applied when the model was made)."""
    w = _original_weight(original, path, alignment)
    if w is None or shared.is_meta or w.shape != shared.shape:
        return shared
    with torch.no_grad():
        flat, ref = w.flatten(1).float(), shared.flatten(1).float()
        gains = (flat * ref).sum(1) / ref.square().sum(1).clamp_min(1e-30)
        return (gains[:, None] * ref).view_as(shared)


def _group_report(
    original: nn.Module, shared: nn.Module, key: str, holder: SharedConvParams, members: list[str], alignment: Alignment
) -> GroupReport:
    def numel(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    delta: tuple[int, tuple[float, ...] | None] = (0, None)

    if holder.method == "basis":  # members are the `.shared` convs of BasisConv2d modules
        paths = [m.rpartition(".")[0] for m in members]
        bases = [shared.get_submodule(p) for p in paths]
        before = sum(numel(original.get_submodule(p)) for p in paths)
        after = numel(holder) + sum(numel(b) for b in bases)  # a basis module does not register the holder
        error = _relative_error(original, paths, [b.effective_weight() for b in bases], alignment)  # type: ignore[operator]
    else:
        paths = members
        convs = [shared.get_submodule(p) for p in paths]
        before = numel(holder) * len(members)
        after = numel(holder) + sum(p.numel() for c in convs for p in c._parameters.values() if p is not None)
        computed = [cast(torch.Tensor, c.weight) for c in convs]  # the shared weight, with gains and deltas
        base: list[torch.Tensor] = [holder.weight] * len(paths)
        if holder.init == "scaled":  # members apply per-channel gains (maybe folded into their BatchNorm)
            computed = [_with_best_gains(original, p, w, alignment) for p, w in zip(paths, computed)]
            base = [_with_best_gains(original, p, holder.weight, alignment) for p in paths]
        error = _relative_error(original, paths, computed, alignment)
        ranks = [int(getattr(c, "delta_rank", 0)) for c in convs]
        if any(ranks):
            delta = (max(ranks), _captured(original, paths, base, computed, alignment))
    return GroupReport(
        key=key,
        stage=holder.stage,
        position=holder.position,
        members=tuple(paths),
        shape=tuple(holder.weight.shape),
        size=numel(holder),
        params_before=before,
        params_after=after,
        dissimilarity=error,
        delta_rank=delta[0],
        delta_captured=delta[1],
    )


def _captured(
    original: nn.Module,
    members: list[str],
    base: list[torch.Tensor],
    computed: list[torch.Tensor],
    alignment: Alignment,
) -> tuple[float, ...] | None:
    """Per member, ``1 - ||W_i - computed_i||^2 / ||W_i - base_i||^2``: the share of what the shared weight alone
    (``base``) misses of the original member that its delta (``computed``) recovers."""
    out = []
    with torch.no_grad():
        for path, b, c in zip(members, base, computed):
            w = _original_weight(original, path, alignment)
            if w is None or c.is_meta or w.shape != c.shape:
                return None
            missed = (w.double() - b.double()).square().sum().item()
            left = (w.double() - c.double()).square().sum().item()
            out.append(1.0 - left / missed if missed else 1.0)
    return tuple(out)


def _sharing_scopes(shared: nn.Module) -> set[str]:
    """Paths of the modules whose parameters sharing changed in ``shared``: its shared convs and basis modules."""
    scopes = set()
    for path, module in shared.named_modules():
        if is_shared_conv(module):
            scopes.add(path)
            if getattr(getattr(module, "_sharify_holder", None), "method", "") == "basis":
                scopes.add(path.rpartition(".")[0])  # the BasisConv2d around its `.shared` conv
    return scopes


def _outside_groups(model: nn.Module, scopes: set[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters that sharing does not touch: not in a holder, nor in one of ``scopes``."""
    scopes = scopes | {p for p, m in model.named_modules() if isinstance(m, SharedConvParams)}
    return {
        name: tuple(p.shape)
        for name, p in model.named_parameters(remove_duplicate=False)
        if not any(name.startswith(f"{s}.") for s in scopes)
    }


def _check_related(original: nn.Module, shared: nn.Module) -> None:
    """Refuses two models whose parameters differ outside the shared groups: not an original and its sharified copy."""
    scopes = _sharing_scopes(shared)
    before, after = _outside_groups(original, scopes), _outside_groups(shared, scopes)
    if before == after:
        return
    name = next((n for n in before if after.get(n) != before[n]), None) or next(n for n in after if n not in before)
    what = (
        f"`{name}` has shape {before[name]} in the original but {after[name]} in the shared model"
        if name in before and name in after
        else f"`{name}` is in the {'original' if name in before else 'shared'} model only"
    )
    raise ValueError(
        f"report(original, shared) got a {type(original).__name__} and a {type(shared).__name__} that differ outside "
        f"the shared groups ({what}), so the shared model was not made from this original; pass the model "
        "sharify.sharify(...) was called on (or one built the same way)"
    )


def _with_folding(shared: nn.Module, groups: list[GroupReport]) -> tuple[list[GroupReport], int | None]:
    """The groups with what :func:`sharify.fold_batchnorm` keeps of each, and the model's parameters after it."""
    folded = bn_folded_members(shared)
    if folded is None:
        return groups, None
    out = []
    for g in groups:
        n = sum(p in folded for p in g.members)
        after = g.params_after + n * g.shape[0]  # a scale per folded member
        for path in g.members:
            member = shared.get_submodule(path)
            if isinstance(member, BasisConv2d) and basis_norm_foldable(member):  # its BatchNorm folds away
                after -= sum(p.numel() for p in member.norm.parameters())
            gain = member._parameters.get("shared_gain")
            if path in folded and gain is not None:  # absorbed into the member's scale
                after -= gain.numel()
        out.append(replace(g, folded=n, params_after_folding=after))
    extra = sum((g.params_after_folding or 0) - g.params_after for g in out)
    return out, count_params(shared) + extra


def report(original: nn.Module, shared: nn.Module) -> ParameterReport:
    """Compares a sharified model with the original it was made from.

    Args:
        original: The model before :func:`sharify.sharify`.
        shared: The sharified model. Either may be wrapped (DDP, DataParallel, ``torch.compile``):
            the report reads the model inside.

    Raises:
        TypeError: An argument is not an ``nn.Module``.
        ValueError: ``original`` is ``shared`` itself or already sharified (e.g. after ``inplace=True``);
            ``shared`` holds no shared convs (e.g. the arguments are swapped); the two models' parameters
            differ outside the shared groups (paths or shapes: ``shared`` was not made from ``original``).
        TieError: The sharing of ``shared`` is broken (see :func:`sharify.verify`), so its counts would be
            wrong: call :func:`sharify.retie` first.

    Example:
        >>> import torchvision, sharify
        >>> model = torchvision.models.resnet50()
        >>> r = sharify.report(model, sharify.sharify(model))
        >>> r.params_before, r.params_after
        (25557032, 20469800)
    """
    for name, m in (("original", original), ("shared", shared)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"report expects torch.nn.Module arguments; {name} is a {type(m).__name__}")
    original, shared = unwrap(original)[0], unwrap(shared)[0]  # reading only: wrappers are looked through
    # Comparing a sharified model with itself would report nothing saved and members identical to their
    # shared weight: say so instead of printing a plausible, wrong table.
    keep = "keep an unshared copy (copy.deepcopy(model) before sharify(..., inplace=True)) or use inplace=False"
    if original is shared:
        raise ValueError(
            f"report(original, shared) got the same {type(shared).__name__} twice: the original is the shared "
            f"model (sharify(..., inplace=True) rewrites it); {keep}"
        )
    if not shared_groups(shared) and not any(is_shared_conv(m) for m in shared.modules()):
        swapped = " (are the arguments swapped? report(original, shared))" if shared_groups(original) else ""
        raise ValueError(f"the shared {type(shared).__name__} holds no shared convs{swapped}; pass the model "
                         "sharify.sharify returned as `shared`")  # fmt: skip
    _check_related(original, shared)
    if any(is_shared_conv(m) for m in original.modules()):
        raise ValueError(
            f"the original {type(original).__name__} is already sharified (it holds shared convs), so nothing "
            f"can be compared against it; pass the model as it was before sharify(): {keep}"
        )
    problems = verify(shared)
    if problems:
        raise TieError(
            f"cannot report on {type(shared).__name__}: its sharing is broken ({problems[0]}); "
            "call sharify.retie(shared) first"
        )
    alignment: Alignment = {  # conv paths of each store's module, seen from the model
        scoped_key(scope, path): orders
        for scope, store in shared_stores(shared).items()
        for path, orders in store.alignment.items()
    }
    scopes = {scoped_key(scope, k): scope for scope, store in shared_stores(shared).items() for k in store.holders()}
    groups = [_group_report(original, shared, k, h, m, alignment) for k, (h, m) in shared_groups(shared).items()]
    groups = [replace(g, stage=scoped_key(scopes.get(g.key, ""), g.stage)) for g in groups]  # stage path in `shared`
    groups, after_folding = _with_folding(shared, groups)
    return ParameterReport(
        model=type(shared).__name__,
        params_before=count_params(original),
        params_after=count_params(shared),
        groups=tuple(groups),
        params_after_folding=after_folding,
    )
