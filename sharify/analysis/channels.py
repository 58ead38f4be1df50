"""Channel slots: the hidden channels of a residual block that can be permuted without changing its function.

The hidden channels of a residual block -- those a conv passes to the next conv of the same block
through per-channel operations only (BatchNorm, activations, dropout) -- are in an arbitrary order:
permuting the producing conv's output channels, the BatchNorm's channels and the consuming conv's
input channels together leaves what the model computes unchanged. :func:`channel_slots` finds, on the
traced graph, a member conv's free input and output channels; :mod:`sharify.rewrite.align` permutes
them so that the members of a group agree before their tensors are combined (``align=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["ChannelSlot", "channel_slots"]

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
