"""Channel slots: the hidden channels of a residual block that can be permuted without changing its function.

The hidden channels of a residual block -- those a conv passes to the next conv of the same block
through per-channel operations only (BatchNorm, activations, dropout) -- are in an arbitrary order:
permuting the producing conv's output channels, the BatchNorm's channels and the consuming conv's
input channels together leaves what the model computes unchanged. :func:`channel_slots` finds, on the
traced graph, a member conv's free input and output channels; :mod:`sharify.rewrite.align` permutes
them so that the members of a group agree before their tensors are combined (``align=True``).
"""

from __future__ import annotations

import operator
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
        producer: Path of the conv (or Linear) whose output channels they are.
        consumer: Path of the conv (or Linear) whose input channels they are.
        norms: Paths of the BatchNorms between the two, whose per-channel tensors are permuted along.
        heads: Attention heads (0: single channels move). The producer is a fused qkv projection whose
            outputs are ``chunks`` blocks (q, k, v) of ``heads`` heads of ``dim`` channels, the consumer the
            output projection whose inputs are ``heads`` heads of ``dim``: whole heads move, alike in q, k, v
            and the projection's inputs (see :func:`head_slot`).
        chunks: With ``heads``: the blocks of the producer's outputs (3: q, k, v).
    """

    producer: str
    consumer: str
    norms: tuple[str, ...] = ()
    heads: int = 0
    chunks: int = 1

    def channel_order(self, order: torch.Tensor, channels: int, side: int) -> torch.Tensor:
        """``order`` (over channels, or over heads) as an order over the ``channels`` producer outputs
        (``side=1``) or consumer inputs (``side=0``)."""
        if not self.heads:
            return order
        chunks = self.chunks if side == 1 else 1
        dim = channels // (chunks * self.heads)
        one = (order[:, None] * dim + torch.arange(dim)).flatten()
        return torch.cat([one + t * self.heads * dim for t in range(chunks)])


def _dense(module: nn.Module | None) -> bool:
    """A dense conv or an ``nn.Linear`` (a transformer MLP's fc1 -> activation -> fc2 hidden units are free)."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1) or isinstance(module, nn.Linear)


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


#: What may run between a fused qkv projection and the output projection for whole heads to be free: the ops of
#: attention itself (reshapes, the softmax or ``scaled_dot_product_attention``, scaling by constants), acting alike
#: on every head. A tensor from outside (a relative position bias per head, a mask, rotary tables) makes heads
#: not free.
_HEAD_METHODS = frozenset({
    "reshape", "view", "permute", "transpose", "unbind", "contiguous", "softmax", "flatten", "unflatten", "mul",
    "div", "size", "float", "type_as", "to", "__getitem__",
})  # fmt: skip
_HEAD_FUNCTIONS: frozenset[Callable[..., object]] = frozenset({
    operator.getitem, operator.mul, operator.truediv, operator.matmul, torch.matmul, torch.unbind, torch.softmax,
    F.softmax, F.dropout, F.scaled_dot_product_attention, torch.transpose, torch.reshape, torch.permute,
    torch.flatten,
})  # fmt: skip


def _head_node_ok(node: fx.Node, modules: Mapping[str, nn.Module], dim: int) -> bool:
    if node.op == "call_method":
        return node.target in _HEAD_METHODS
    if node.op == "call_function":
        return node.target in _HEAD_FUNCTIONS
    if node.op == "call_module":
        module = modules.get(str(node.target))
        norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and tuple(module.normalized_shape) == (dim,)
        return norm or isinstance(module, (nn.Identity, nn.Dropout, nn.Softmax))
    return False


def _tensor(node: object) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def head_slot(member: fx.Node, modules: Mapping[str, nn.Module], calls: Mapping[str, int]) -> ChannelSlot | None:
    """The attention heads between a fused qkv ``nn.Linear`` (``member``) and the output projection, if free.

    Structural: the qkv output is reshaped to ``(..., 3, heads, dim)``; every node from there to the one Linear it
    reaches is an attention op acting alike on each head (:data:`_HEAD_METHODS`, :data:`_HEAD_FUNCTIONS`, a
    LayerNorm over ``dim``) with no tensor from elsewhere; the projection reads a reshape of ``(..., heads, dim)``.
    Permuting whole heads in q, k, v and the projection's inputs together then leaves the function unchanged.
    """
    qkv = modules.get(str(member.target))
    users = list(member.users)
    if not isinstance(qkv, nn.Linear) or calls.get(str(member.target), 0) != 1 or len(users) != 1:
        return None
    split = users[0].meta.get("val")
    if not isinstance(split, torch.Tensor) or split.dim() < 3 or tuple(split.shape[-3:-2]) != (3,):
        return None
    heads, dim = int(split.shape[-2]), int(split.shape[-1])
    if heads < 2 or 3 * heads * dim != qkv.out_features:
        return None
    region, todo, consumers = {member}, [users[0]], set()
    while todo:
        node = todo.pop()
        if node in region:
            continue
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, nn.Linear):
            consumers.add(node)
            continue
        if not _head_node_ok(node, modules, dim):
            return None
        region.add(node)
        todo.extend(node.users)
    if len(consumers) != 1 or any(_tensor(a) and a not in region for n in region - {member} for a in n.all_input_nodes):
        return None  # a tensor from outside the attention (a bias per head, a mask) meets the heads
    proj = consumers.pop()
    proj_module = modules[str(proj.target)]
    assert isinstance(proj_module, nn.Linear)
    feed = proj.args[0] if proj.args else None
    while isinstance(feed, fx.Node) and isinstance(modules.get(str(feed.target)), (nn.Identity, nn.Dropout)):
        feed = feed.args[0] if feed.args else None  # an Identity or Dropout before the projection (a norm over
        # all heads' channels would need its weights permuted too: no head slot then)
    merged = feed.args[0] if isinstance(feed, fx.Node) and feed.args else None
    before = merged.meta.get("val") if isinstance(merged, fx.Node) else None
    if not isinstance(before, torch.Tensor) or tuple(before.shape[-2:]) != (heads, dim):
        return None
    if proj_module.in_features != heads * dim or calls.get(str(proj.target), 0) != 1 or len(proj.all_input_nodes) != 1:
        return None
    return ChannelSlot(str(member.target), str(proj.target), (), heads, 3)


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
    if isinstance(modules.get(path), nn.Linear):
        outputs = outputs or head_slot(member, modules, calls)
        inputs = inputs or _heads_into(member, modules, calls)
    return inputs, outputs


def _heads_into(member: fx.Node, modules: Mapping[str, nn.Module], calls: Mapping[str, int]) -> ChannelSlot | None:
    """The head slot (:func:`head_slot`) whose consumer is the Linear ``member`` (an attention's output projection):
    found by walking back through attention ops to the qkv projection."""
    todo, seen = list(member.all_input_nodes), set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Linear):
            slot = head_slot(node, modules, calls)
            if slot is not None and slot.consumer == str(member.target):
                return slot
        elif _head_node_ok(node, modules, -1) or (
            node.op == "call_module" and isinstance(modules.get(str(node.target)), (nn.LayerNorm, nn.RMSNorm))
        ):
            todo.extend(a for a in node.all_input_nodes if not isinstance(a.meta.get("val"), (int, float, torch.Size)))
    return None
