"""Channel alignment: permute each member's free channels to match its group before the tensors are combined.

Blocks trained independently order their hidden channels independently (see
:mod:`sharify.analysis.channels`), and the average of their filters mixes unrelated channels (the
permutation symmetry of *Git Re-Basin*, Ainsworth et al., ICLR 2023, there between networks, here
between the blocks of one network). ``sharify(model, align=True)`` first permutes every member's free
channels so that its weight is as close as possible to the other members' -- a function-preserving
change of the original model -- and only then combines the members (``init="average"``, ``"scaled"``,
``"first"``, ``"svd"``).

:func:`alignment` is pure tensor math (nothing modified): it returns the permuted tensors, which the
rewrite assigns transactionally. Each permutation is a linear assignment
(``scipy.optimize.linear_sum_assignment``) maximising ``<W_i P, mean_{j != i} W_j>``, i.e. minimising the
distance of a member to the mean of the others; sweeps repeat until no permutation changes (each step
increases the members' total pairwise similarity, so it terminates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..analysis.channels import ChannelSlot

__all__ = ["alignment", "require_scipy"]

#: Per-channel tensors of a BatchNorm, permuted with its channels.
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
_MAX_SWEEPS = 20


def require_scipy() -> Callable[..., tuple[object, object]]:
    """``scipy.optimize.linear_sum_assignment``, or an ImportError that says how to install it."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # pragma: no cover - scipy is in the align and test extras
        raise ImportError("align=True needs scipy: pip install scipy (or pip install 'sharify[align]')") from exc
    return linear_sum_assignment


Read = Callable[[str, str], Tensor | None]


Slots = Sequence[tuple[ChannelSlot | None, ChannelSlot | None]]
Assign = Callable[..., tuple[object, object]]


class _Permuted:
    """The tensors alignment has permuted so far, over the model's (``read``), and the orders applied per conv."""

    def __init__(self, read: Read) -> None:
        self.read = read
        self.values: dict[str, dict[str, Tensor]] = {}
        self.orders: dict[str, dict[str, list[int]]] = {}

    def get(self, path: str, name: str) -> Tensor | None:
        """The tensor as alignment has left it so far."""
        if name in self.values.get(path, {}):
            return self.values[path][name]
        return self.read(path, name)

    def move(self, slot: ChannelSlot, order: Tensor) -> None:
        """Permutes the channels of ``slot`` (producer's outputs, its BatchNorms, consumer's inputs) by ``order``
        (an order over heads for a head slot: each head's channels move with it, in q, k and v)."""
        produced, consumed = self.get(slot.producer, "weight"), self.get(slot.consumer, "weight")
        assert produced is not None and consumed is not None
        out_order = slot.channel_order(order, produced.shape[0], 1)
        in_order = slot.channel_order(order, consumed.shape[1], 0)
        self._permute(slot.producer, "weight", out_order, 0)
        self._permute(slot.producer, "bias", out_order, 0)
        for norm in slot.norms:
            for name in _NORM_TENSORS:
                self._permute(norm, name, out_order, 0)
        self._permute(slot.consumer, "weight", in_order, 1)
        self._record(slot.producer, "out", out_order)
        self._record(slot.consumer, "in", in_order)

    def _permute(self, path: str, name: str, order: Tensor, dim: int) -> None:
        t = self.get(path, name)
        if t is not None:
            self.values.setdefault(path, {})[name] = t.index_select(dim, order.to(t.device))

    def _record(self, path: str, side: str, order: Tensor) -> None:
        previous = self.orders.setdefault(path, {}).get(side)
        self.orders[path][side] = (order if previous is None else torch.as_tensor(previous)[order]).tolist()


def alignment(
    groups: Sequence[tuple[Sequence[str], Slots]], read: Read
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, list[int]]]]:
    """Permuted tensors that align the members of each group (nothing is modified).

    Args:
        groups: Per group, its member paths and per member its ``(input slot, output slot)``.
        read: ``read(module path, tensor name)``: the current tensor (``None`` if the module has none).

    Returns:
        ``(values, permutations)``: the new tensors ``{module path: {name: tensor}}`` of every module whose
        channels moved, and per conv whose channels moved ``{"in": order, "out": order}`` (new channel ``k``
        is the original's ``order[k]``), for the report.
    """
    assign = require_scipy()
    state = _Permuted(read)
    done: set[ChannelSlot] = set()
    for members, slots in groups:
        if any(w is None or w.is_meta for w in (state.get(p, "weight") for p in members)):
            continue  # a meta-device model has no values to align
        for _round in range(3):  # in and out permutations interact (bottleneck members have both)
            moved = False
            for side in (0, 1):
                movable = [i for i, s in enumerate(slots) if s[side] is not None and s[side] not in done]
                moved |= _sweep(state, members, slots, side, movable, assign)
            if not moved:
                break
        done.update(s for pair in slots for s in pair if s is not None)
    return state.values, state.orders


def _sweep(
    state: _Permuted, members: Sequence[str], slots: Slots, side: int, movable: list[int], assign: Assign
) -> bool:
    """Permutes the ``side`` channels of each ``movable`` member to match the others, sweeping until none changes;
    whether any did."""
    moved = False
    for _ in range(_MAX_SWEEPS):
        changed = False
        for i in movable:
            slot = slots[i][side]
            assert slot is not None
            feats = [_channel_features(state.get(p, "weight"), side, slot) for p in members]
            ref = torch.stack([f for j, f in enumerate(feats) if j != i]).mean(0)
            similarity = (feats[i] @ ref.T).cpu().numpy()
            _, cols = assign(similarity, maximize=True)
            order = torch.as_tensor(cols).argsort()  # new channel k <- old channel order[k]
            if torch.equal(order, torch.arange(len(order))):
                continue
            state.move(slot, order)
            changed = moved = True
        if not changed:
            break
    return moved


def _channel_features(weight: Tensor | None, side: int, slot: ChannelSlot) -> Tensor:
    """One row per input (``side=0``) or output (``side=1``) channel of a conv or Linear weight, in float64; one
    row per head for a head slot (its q, k and v rows, or its projection columns)."""
    assert weight is not None
    w = weight.detach().double()
    rows = w.transpose(0, 1) if side == 0 else w
    if not slot.heads:
        return rows.flatten(1)
    chunks = slot.chunks if side == 1 else 1
    return rows.reshape(chunks, slot.heads, -1, rows.shape[-1]).transpose(0, 1).flatten(1)
