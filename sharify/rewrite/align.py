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


def alignment(
    groups: Sequence[tuple[Sequence[str], Sequence[tuple[ChannelSlot | None, ChannelSlot | None]]]], read: Read
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
    values: dict[str, dict[str, Tensor]] = {}
    orders: dict[str, dict[str, list[int]]] = {}

    def get(path: str, name: str) -> Tensor | None:
        if name in values.get(path, {}):
            return values[path][name]
        return read(path, name)

    def permute(path: str, name: str, order: Tensor, dim: int) -> None:
        t = get(path, name)
        if t is not None:
            values.setdefault(path, {})[name] = t.index_select(dim, order.to(t.device))

    def record(path: str, side: str, order: Tensor) -> None:
        previous = orders.setdefault(path, {}).get(side)
        orders[path][side] = (order if previous is None else torch.as_tensor(previous)[order]).tolist()

    def apply(slot: ChannelSlot, order: Tensor) -> None:
        permute(slot.producer, "weight", order, 0)
        permute(slot.producer, "bias", order, 0)
        for norm in slot.norms:
            for name in _NORM_TENSORS:
                permute(norm, name, order, 0)
        permute(slot.consumer, "weight", order, 1)
        record(slot.producer, "out", order)
        record(slot.consumer, "in", order)

    done: set[ChannelSlot] = set()
    for members, slots in groups:
        weights = [get(p, "weight") for p in members]
        if any(w is None or w.is_meta for w in weights):
            continue  # a meta-device model has no values to align
        for _round in range(3):  # in and out permutations interact (bottleneck members have both)
            moved = False
            for side in (0, 1):
                movable = [i for i, s in enumerate(slots) if s[side] is not None and s[side] not in done]
                if not movable:
                    continue
                for _sweep in range(_MAX_SWEEPS):
                    changed = False
                    for i in movable:
                        feats = [_channel_features(get(p, "weight"), side) for p in members]
                        ref = torch.stack([f for j, f in enumerate(feats) if j != i]).mean(0)
                        similarity = (feats[i] @ ref.T).cpu().numpy()
                        _, cols = assign(similarity, maximize=True)
                        order = torch.as_tensor(cols).argsort()  # new channel k <- old channel order[k]
                        if torch.equal(order, torch.arange(len(order))):
                            continue
                        slot = slots[i][side]
                        assert slot is not None
                        apply(slot, order)
                        changed = moved = True
                    if not changed:
                        break
            if not moved:
                break
        done.update(s for pair in slots for s in pair if s is not None)
    return values, orders


def _channel_features(weight: Tensor | None, side: int) -> Tensor:
    """One row per input (``side=0``) or output (``side=1``) channel of a conv weight, in float64."""
    assert weight is not None
    w = weight.detach().double()
    return (w.transpose(0, 1) if side == 0 else w).flatten(1)
