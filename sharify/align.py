"""Channel alignment: permute each member's free channels to match its group before the tensors are combined.

The hidden channels of a residual block -- those a conv passes to the next conv of the same block
through per-channel operations only (BatchNorm, activations, dropout) -- are in an arbitrary order:
permuting the producing conv's output channels, the BatchNorm's channels and the consuming conv's
input channels together leaves what the model computes unchanged. Blocks trained independently
therefore order them independently, and the average of their filters mixes unrelated channels (the
permutation symmetry of *Git Re-Basin*, Ainsworth et al., ICLR 2023, there between networks, here
between the blocks of one network). ``sharify(model, align=True)`` first permutes every member's free
channels so that its weight is as close as possible to the other members' -- a function-preserving
change of the original model -- and only then combines the members (``init="average"``, ``"scaled"``,
``"first"``, ``"svd"``).

Two parts, as everywhere in sharify: :func:`channel_slots` (analysis, on the traced graph) finds a
member's free input and output channels; :func:`alignment` (pure tensor math, nothing modified)
returns the permuted tensors, which the rewrite assigns transactionally. Each permutation is a linear
assignment (``scipy.optimize.linear_sum_assignment``) maximising ``<W_i P, mean_{j != i} W_j>``,
i.e. minimising the distance of a member to the mean of the others; sweeps repeat until no
permutation changes (each step increases the members' total pairwise similarity, so it terminates).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["ChannelSlot", "alignment", "channel_slots", "require_scipy"]

#: Modules that act on each channel alone, without parameters that would have to be permuted.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., object]] = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, torch.tanh, F.dropout, F.dropout2d,
})  # fmt: skip
_ELEMENTWISE_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous"})
#: Per-channel tensors of a BatchNorm, permuted with its channels.
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
_MAX_SWEEPS = 20


@dataclass(frozen=True)
class ChannelSlot:
    """Channels between two convs of a block that can be permuted without changing the model's function.

    Attributes:
        producer: Path of the conv whose output channels they are.
        consumer: Path of the conv whose input channels they are.
        norms: Paths of the BatchNorms between the two, whose per-channel tensors are permuted along.
    """

    producer: str
    consumer: str
    norms: tuple[str, ...] = ()


def _dense(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _per_channel(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """``"norm"``/``"elementwise"`` for a node that acts on each channel alone (and is permutable), else ``None``."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "norm"
        if isinstance(module, _ELEMENTWISE_MODULES) or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
            return "elementwise"
        return None
    tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensor_args) != 1 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return "elementwise"
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return "elementwise"
    return None


def channel_slots(
    member: fx.Node, modules: Mapping[str, nn.Module], calls: Mapping[str, int]
) -> tuple[ChannelSlot | None, ChannelSlot | None]:
    """The member conv's free input channels and free output channels (``None`` where they are not free).

    Input channels are free when they come from one dense conv through per-channel nodes only, each
    used by nothing else; output channels likewise when they go to one dense conv and nowhere else
    (not into a residual addition, whose channels the whole stage shares). Every module involved must
    be called once per forward (a reused module's channels cannot be permuted for one use alone).

    Args:
        member: The member's ``call_module`` node in the traced graph.
        modules: ``dict(model.named_modules())``.
        calls: Calls per module path in the graph.
    """
    path = str(member.target)
    if not _dense(modules.get(path)):
        return None, None

    def once(p: str) -> bool:
        return calls.get(p, 0) == 1

    def walk(start: fx.Node | None, step: Callable[[fx.Node], fx.Node | None]) -> tuple[fx.Node, list[str]] | None:
        node, norms = start, list[str]()
        while node is not None:
            if node.op == "call_module" and _dense(modules.get(str(node.target))):
                return node, norms
            kind = _per_channel(node, modules)
            if kind is None:
                return None
            if kind == "norm":
                if not once(str(node.target)):
                    return None
                norms.append(str(node.target))
            node = step(node)
        return None

    def single_user(node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def single_input(node: fx.Node) -> fx.Node | None:
        # walking back, each node on the way must feed the next one alone
        arg = next((a for a in node.args if isinstance(a, fx.Node)), None)
        return arg if arg is not None and len(arg.users) == 1 else None

    inputs = outputs = None
    first = member.args[0] if member.args and isinstance(member.args[0], fx.Node) else None
    if first is not None and len(first.users) == 1:
        found = walk(first, single_input)
        if found is not None and once(str(found[0].target)):
            inputs = ChannelSlot(str(found[0].target), path, tuple(reversed(found[1])))
    after = single_user(member)
    if after is not None:
        found = walk(after, single_user)
        # the consumer reads these channels as its only input
        if found is not None and once(str(found[0].target)) and len(found[0].all_input_nodes) == 1:
            outputs = ChannelSlot(path, str(found[0].target), tuple(found[1]))
    return inputs, outputs


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
