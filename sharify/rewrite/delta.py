"""Relaxed sharing: each member's low-rank delta from what the shared tensor misses (``delta_rank``,
``param_budget``).

A member of a group computes with ``gain * (W + B @ A)`` (:class:`~sharify.layers.SharedConvMixin`), where ``W``
is the shared weight viewed as ``(out, d)`` with ``d = in/groups * kh * kw``, ``gain`` its per-channel gains
(``init="scaled"``; ones otherwise) and ``B @ A`` its own rank-``r`` delta. The member's *target* is what it
computed before sharing, divided by its gains: ``T_i = W_i / gain_i``. :func:`residual` is ``T_i - W``, and
:func:`svd_delta` its truncated SVD: by Eckart-Young the best rank-``r`` delta in the Frobenius norm, exact at
``r = min(out, d)``, with an error that never grows with ``r``. The singular values are split evenly
(``B = U sqrt(S)``, ``A = sqrt(S) V^T``); directions with a zero singular value keep ``A``'s unit row and a zero
``B`` column, so that training can still move them.

:func:`budget_ranks` chooses one rank per group for a parameter budget: greedily, the next rank of the group
whose next singular values remove the most relative squared error (``sum_i S_i[r]^2 / ||T_i||^2`` over the
members) per parameter, up to the rank at which the group would cost as much as its members unshared. Each
group's marginal gains fall with the rank (the singular values are sorted), so the greedy choice is the optimum
of the fractional problem and within one increment of the integer one.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers import Delta
from ..planning.rules import delta_size

__all__ = ["Decomposition", "GroupSpectra", "MemberTarget", "budget_ranks", "residual", "svd_delta"]


@dataclass(frozen=True)
class MemberTarget:
    """What a member must compute before its gains: its weight and bias divided by them (``init="scaled"``).

    Attributes:
        weight: ``W_i / gain_i``, the member's weight (after channel alignment) with its gains taken out.
        bias: ``b_i / gain_i``, or ``None`` without a bias.
    """

    weight: Tensor
    bias: Tensor | None

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None, gain: Tensor | None) -> MemberTarget:
        """The target of a member with tensors ``weight``/``bias`` and gains ``gain`` (``None``: ones)."""
        if gain is None:
            return cls(weight.detach(), None if bias is None else bias.detach())
        safe = torch.where(gain.abs() < 1e-8, torch.ones_like(gain), gain).detach()  # as init.scaled_tensors
        w = weight.detach() / safe.view(-1, *([1] * (weight.dim() - 1)))
        return cls(w, None if bias is None else bias.detach() / safe)


def residual(target: MemberTarget, shared: Tensor) -> Tensor:
    """``T_i - W`` as an ``(out, d)`` float64 matrix."""
    return (target.weight.double() - shared.detach().double()).flatten(1)


@dataclass(frozen=True)
class Decomposition:
    """The SVD ``U diag(S) V^T`` of a member's :func:`residual` (float64), computed once for choosing its rank and
    making its delta, and ``||T_i||^2``, the scale of its error."""

    u: Tensor
    values: Tensor
    vh: Tensor
    scale: float

    @classmethod
    def of(cls, target: MemberTarget, shared: Tensor) -> Decomposition:
        u, s, vh = torch.linalg.svd(residual(target, shared), full_matrices=False)
        return cls(u, s, vh, float(target.weight.double().square().sum()))

    def delta(self, rank: int, target: MemberTarget, shared: Tensor, shared_bias: Tensor | None) -> Delta:
        """The rank-``rank`` delta in ``shared``'s dtype: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` (a zero
        singular value keeps ``A``'s unit row and a zero ``B`` column), and the bias difference."""
        u, s, vh = self.u[:, :rank], self.values[:rank], self.vh[:rank]
        root = s.sqrt()
        zero = s <= s.max().clamp_min(1e-300) * 1e-12 if s.numel() else s.bool()
        up = torch.where(zero, torch.zeros_like(u), u * root)
        down = torch.where(zero[:, None], vh, root[:, None] * vh)
        bias = None
        if shared_bias is not None and target.bias is not None:
            bias = (target.bias.double() - shared_bias.detach().double()).to(shared_bias.dtype)
        dtype = shared.dtype
        return Delta(up.to(dtype).contiguous(), down.to(dtype).contiguous(), bias)


def svd_delta(target: MemberTarget, shared: Tensor, shared_bias: Tensor | None, rank: int) -> Delta:
    """The member's rank-``rank`` delta: the truncated SVD of :func:`residual`, in ``shared``'s dtype and device.

    Args:
        target: The member's target (:meth:`MemberTarget.of`).
        shared: The group's shared weight.
        shared_bias: The group's shared bias (``None``: the convs have none).
        rank: The rank, ``1 <= rank <= min(out, d)``.

    Returns:
        ``Delta(up (out, rank), down (rank, d), bias)``; ``bias`` is ``T_i``'s bias minus the shared one.
    """
    return Decomposition.of(target, shared).delta(rank, target, shared, shared_bias)


@dataclass(frozen=True)
class GroupSpectra:
    """A group's members' singular values and scales, and what a rank of its deltas costs.

    Attributes:
        key: The group's key.
        values: Per member, the singular values of its residual (descending).
        scales: Per member, ``||T_i||^2``.
        out: Output channels of the members.
        row: ``d = in/groups * kh * kw``.
        bias_numel: Elements of a member's bias (0 without).
    """

    key: str
    values: Sequence[Tensor]
    scales: Sequence[float]
    out: int
    row: int
    bias_numel: int

    @property
    def max_rank(self) -> int:
        """The highest rank a budget gives: the group -- shared weight and bias, each member's delta and bias
        delta -- stays strictly smaller than its members unshared (``out*d + b + n*(r*(out + d) + b) < n*(out*d +
        b)``); from there on, not sharing is cheaper and exact."""
        n, b = len(self.values), self.bias_numel
        below = ((n - 1) * self.out * self.row - b - 1) // (n * (self.out + self.row))
        return max(0, min(self.out, self.row, below))

    def gain(self, rank: int) -> float:
        """The relative squared error the ``rank``-th delta direction (0-based) removes, summed over members."""
        return sum(float(v[rank].square()) / max(s, 1e-300) for v, s in zip(self.values, self.scales) if rank < len(v))

    def cost(self, rank: int) -> int:
        """Parameters added by going from rank ``rank`` to ``rank + 1`` in every member."""
        n = len(self.values)
        return n * (
            delta_size(rank + 1, self.out, self.row, self.bias_numel)
            - delta_size(rank, self.out, self.row, self.bias_numel)
        )


def budget_ranks(groups: Sequence[GroupSpectra], available: int) -> dict[str, int]:
    """One delta rank per group spending at most ``available`` parameters, greedily by error removed per parameter.

    Args:
        groups: The groups' spectra (:class:`GroupSpectra`).
        available: Parameters the deltas may take in all (the budget minus full sharing's count).

    Returns:
        ``{group key: rank}`` for every group (0: no delta).
    """
    ranks = {g.key: 0 for g in groups}
    heap: list[tuple[float, int, GroupSpectra]] = []
    for i, g in enumerate(groups):
        if g.max_rank:
            heapq.heappush(heap, (-g.gain(0) / g.cost(0), i, g))
    left = available
    while heap:
        _, i, g = heapq.heappop(heap)
        rank = ranks[g.key]
        cost = g.cost(rank)
        if cost > left:
            continue  # its next increments cost as much or more: this group stops here
        ranks[g.key] = rank + 1
        left -= cost
        if rank + 1 < g.max_rank:
            heapq.heappush(heap, (-g.gain(rank + 1) / g.cost(rank + 1), i, g))
    return ranks
