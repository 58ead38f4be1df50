"""Parameter report of a sharified model against its original: what sharing saved, and at what cost.

Per group it gives the members, the size of the shared tensor, the parameters before and after, and
the relative dissimilarity of the original members to what the shared model computes in their place,
``mean_i ||W_i - W_shared|| / ||W_i||``: the paper's question "how similar are the blocks?" answered
for the user's own weights (0 = identical; ``sqrt((n-1)/n)`` for the average of n independent random
tensors). For filter-basis groups ``W_shared`` is each block's effective conv (eval-mode BatchNorm
folded), so the column is the relative reconstruction error of the basis; for ``init="scaled"``
groups it is ``diag(a_i) W_shared`` with the member's per-channel gains.

For deployment it also gives ``params_after_folding``: what remains once each BatchNorm is folded
into the conv before it (:mod:`sharify.folding`): a member followed by its block's BatchNorm needs
its own folded weight. The BatchNorm -> bias conversion itself is not counted: it changes the
original and the sharified model by the same amount.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ._wrappers import unwrap
from .folding import bn_folded_members
from .layers import SharedConvParams, shared_groups
from .plan import count_params

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

    @property
    def saved(self) -> int:
        return self.params_before - self.params_after

    @property
    def params_after_folding(self) -> int | None:
        """Parameters after conv-BN folding: each folded member needs its own copy of the shared tensor;
        the shared one stays only while some member is not folded."""
        if self.folded is None:
            return None
        return self.params_after + self.folded * self.size - (self.size if self.folded == len(self.members) else 0)


@dataclass(frozen=True)
class ParameterReport:
    """Parameters of an original and a sharified model, per sharing group.

    ``str(report)`` is a plain-text table; :meth:`to_markdown` and :meth:`to_dict` give the same
    content as Markdown and JSON-ready data.
    """

    model: str
    params_before: int
    params_after: int
    groups: tuple[GroupReport, ...]
    #: Parameters left after folding every BatchNorm into the conv before it (``None``: not traceable).
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
        """Fraction of the original parameters still saved after conv-BN folding."""
        if self.params_after_folding is None or not self.params_before:
            return None
        return (self.params_before - self.params_after_folding) / self.params_before

    def stages(self) -> dict[str, dict[str, int]]:
        """Per stage: groups, members, parameters before/after (of the shared convs only)."""
        out: dict[str, dict[str, int]] = {}
        for g in self.groups:
            s = out.setdefault(g.stage, {"groups": 0, "members": 0, "params_before": 0, "params_after": 0})
            s["groups"] += 1
            s["members"] += len(g.members)
            s["params_before"] += g.params_before
            s["params_after"] += g.params_after
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
            "groups": [
                {**asdict(g), "saved": g.saved, "params_after_folding": g.params_after_folding} for g in self.groups
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _rows(self) -> list[list[str]]:
        rows = []
        for g in self.groups:
            d = "-" if g.dissimilarity is None else f"{g.dissimilarity:.3f}"
            rows.append(
                [g.key, str(len(g.members)), "x".join(map(str, g.shape)), f"{g.params_before:,}",
                 f"{g.params_after:,}", f"{g.saved:,}", d]
            )  # fmt: skip
        rows.append(["total (model)", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
                     f"{self.saved:,} ({-self.reduction:+.1%})", ""])  # fmt: skip
        return rows

    _HEADER = ("group", "members", "weight", "params before", "params after", "saved", "dissimilarity")

    def __str__(self) -> str:
        rows = [list(self._HEADER), *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        lines = [f"{self.model}: {self.params_before:,} -> {self.params_after:,} parameters ({-self.reduction:+.1%})"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join([*lines, *self._folding_lines()])

    def _folding_lines(self) -> list[str]:
        if self.params_after_folding is None or self.reduction_after_folding is None:
            return []
        folded = sum(g.folded or 0 for g in self.groups)
        members = sum(len(g.members) for g in self.groups)
        return [
            f"after conv-BN folding (deployment): {self.params_after_folding:,} parameters "
            f"({-self.reduction_after_folding:+.1%}); {folded} of {members} shared convs feed a BatchNorm "
            "and get their own folded weight"
        ]

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self._HEADER) + " |", "|" + "---|" * len(self._HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in self._rows()]
        folding = self._folding_lines()
        return "\n".join([*lines, "", *folding] if folding else lines)


def _relative_error(original: nn.Module, members: list[str], computed: list[torch.Tensor]) -> float | None:
    """``mean_i ||W_i - computed_i|| / ||W_i||`` over the original members' weights."""
    values = []
    with torch.no_grad():
        for path, c in zip(members, computed):
            try:
                w = original.get_submodule(path).weight
            except AttributeError:
                return None
            if not isinstance(w, torch.Tensor) or w.is_meta or c.is_meta or w.shape != c.shape:
                return None
            norm = w.float().norm().item()
            values.append((w.float() - c.float()).norm().item() / norm if norm else math.nan)
    return sum(values) / len(values) if values else None


def _with_best_gains(original: nn.Module, path: str, shared: torch.Tensor) -> torch.Tensor:
    """``diag(a) W`` with the least-squares per-channel gains ``a`` of the original member (the gains
    ``init="scaled"`` applied when the model was made)."""
    w = getattr(original.get_submodule(path), "weight", None)
    if not isinstance(w, torch.Tensor) or w.is_meta or shared.is_meta or w.shape != shared.shape:
        return shared
    with torch.no_grad():
        flat, ref = w.flatten(1).float(), shared.flatten(1).float()
        gains = (flat * ref).sum(1) / ref.square().sum(1).clamp_min(1e-30)
        return (gains[:, None] * ref).view_as(shared)


def _group_report(
    original: nn.Module, shared: nn.Module, key: str, holder: SharedConvParams, members: list[str]
) -> GroupReport:
    def numel(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    if holder.method == "basis":  # members are the `.shared` convs of BasisConv2d modules
        paths = [m.rpartition(".")[0] for m in members]
        bases = [shared.get_submodule(p) for p in paths]
        before = sum(numel(original.get_submodule(p)) for p in paths)
        after = numel(holder) + sum(numel(b) for b in bases)  # a basis module does not register the holder
        error = _relative_error(original, paths, [b.effective_weight() for b in bases])  # type: ignore[operator]
    else:
        paths = members
        before = numel(holder) * len(members)
        after = numel(holder)
        computed: list[torch.Tensor] = [holder.weight] * len(paths)
        if holder.init == "scaled":  # members apply per-channel gains (maybe folded into their BatchNorm)
            computed = [_with_best_gains(original, p, holder.weight) for p in paths]
        error = _relative_error(original, paths, computed)
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
    )


def report(original: nn.Module, shared: nn.Module) -> ParameterReport:
    """Compares a sharified model with the original it was made from.

    Args:
        original: The model before :func:`sharify.sharify`.
        shared: The sharified model. Either may be wrapped (DDP, DataParallel, ``torch.compile``):
            the report reads the model inside.

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
    groups = [_group_report(original, shared, k, h, m) for k, (h, m) in shared_groups(shared).items()]
    folded = bn_folded_members(shared)
    after_folding = None
    if folded is not None:
        counts = {k: sum(p in folded for p in paths) for k, (_, paths) in shared_groups(shared).items()}
        groups = [replace(g, folded=counts.get(g.key, 0)) for g in groups]
        after_folding = count_params(shared) + sum((g.params_after_folding or 0) - g.params_after for g in groups)
    return ParameterReport(
        model=type(shared).__name__,
        params_before=count_params(original),
        params_after=count_params(shared),
        groups=tuple(groups),
        params_after_folding=after_folding,
    )
