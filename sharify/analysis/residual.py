"""Finding residual blocks and stages in a traced, shape-propagated graph. Purely structural.

Definitions (all on the dataflow graph, never on module names):

* A **residual add** is an addition ``a + b`` (``+``, ``+=``, ``torch.add``, ``Tensor.add``/``add_``) of two
  same-shaped feature maps (at least 3-D: ``(N, C, H, W)``, tokens ``(N, L, C)``, ...) that both depend on the
  model input and share ancestors, where at least one operand's *exclusive* ancestors (those the other operand does
  not have) include a conv or an ``nn.Linear``. The side with more convs (then: more spatial convs, then: more
  Linear layers) is the **branch**, the other the **shortcut** (identity, projection, pooling, ...): a
  transformer's ``x + attn(norm(x))`` and ``x + mlp(norm(x))`` are blocks, and so are Mixer's token and channel
  MLPs. Scales, layer scale, drop path or SE products on the branch
  are simply part of it. Additions of vectors (``(N, C)``, or ``(N, C, 1, 1)`` maps whose operands are both
  globally pooled: an attention or recurrent context carried across blocks, an LSTM-style gate
  ``fc(x) + h``) are no blocks, and do not break the chain of the blocks around them.
* Each residual add is a **block**. Its **predecessor** is the latest residual add that both
  operands depend on, provided it lies inside the same enclosing block (blocks nest: EDSR-style
  global skips, Res2Net's hierarchical adds, RepVGG's parallel branches). Following predecessors
  gives the chains of blocks along the residual stream.
* A **stage** is a run of consecutive blocks of one chain whose outputs have the same shape. Its
  **first block** is the first block whose output has that shape, residual or not: if convs run
  between the predecessor and the stage's first residual block and produce the stage's shape
  (MobileNetV2's non-residual entry block, ConvNeXt's downsample layer), the stage has an
  **entry**: its first block is that non-residual one, and all its residual blocks are non-first.
  The exception is the **stem**: whatever runs before the first residual block of a chain (there is
  no predecessor) is no entry, even when it ends with the stage's shape, so the first stage's first
  block is its first residual block. That is ResNet-34's ``layer1.0``, which DSFB keeps unshared
  although the stem's max-pool already outputs layer1's shape; likewise a CIFAR ResNet whose stem conv
  outputs the first stage's shape, or a transition conv written before the first stage's blocks
  (``tests/nets.py::LoopNet``: ``skip_first_block=True`` leaves out block 0 of its first stage, but not
  of its second, which has an entry). Code before a chain's first residual block is an entry only when
  it is evidently a block of the same container: its last conv outputs the stage's shape and lies in a
  module beside the residual block inside that block's (non-root) container -- MobileNetV2's
  ``features.2``, the non-residual entry block of ``features.3``'s stage, but not ResNet's stem, which
  lies outside ``layer1``.
* A block's **branch convs** are the convs on its branch in execution order, except those owned by a
  nested stage (a nested chain of two or more blocks shares among itself).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from .._paths import within
from .tracing import module_path

__all__ = ["Block", "Stage", "common_prefix", "find_stages", "last_candidate_add"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, Tensor.add, Tensor.add_}
_ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class Block:
    """A residual block.

    Attributes:
        index: Position of the block in execution order.
        add: Name of the graph node of its residual add.
        path: Module path of the block: the deepest module containing its branch and shortcut.
        convs: Paths of the convs on its residual branch, in execution order.
        shortcut_convs: Paths of the convs on its shortcut (projections).
        output_shape: Shape of the block's output (the add's result).
        predecessor: Index of the previous block on the residual stream, if any.
        linears: Paths of the ``nn.Linear`` layers on its residual branch, in execution order (a transformer's
            attention or MLP; an SE gate's in a CNN).
        attention: Whether its branch attends (holds a softmax or ``scaled_dot_product_attention``): a
            transformer's attention block rather than its MLP block.
    """

    index: int
    add: str
    path: str
    convs: tuple[str, ...]
    shortcut_convs: tuple[str, ...]
    output_shape: tuple[int, ...]
    predecessor: int | None
    linears: tuple[str, ...] = ()
    attention: bool = False


@dataclass(frozen=True)
class Stage:
    """A run of consecutive blocks whose outputs have one shape.

    Attributes:
        path: Module path of the stage: the deepest module containing all its blocks.
        shape: The blocks' output shape.
        blocks: The blocks, in execution order.
        has_entry: A non-residual block with the stage's output shape precedes ``blocks[0]``, so
            every block in ``blocks`` is a non-first block of the stage. For the first stage of a chain
            only when that block evidently belongs to the stage's container, not to the stem (see the
            module docstring).
    """

    path: str
    shape: tuple[int, ...]
    blocks: tuple[Block, ...]
    has_entry: bool

    @property
    def first_block(self) -> Block | None:
        """The stage's first block if it is residual, else ``None`` (the entry is the first block)."""
        return None if self.has_entry else self.blocks[0]


def common_prefix(paths: Sequence[str]) -> str:
    """Deepest module path containing all ``paths`` (``""`` is the root)."""
    if not paths:
        return ""
    parts = [p.split(".") if p else [] for p in paths]
    prefix: list[str] = []
    for level in zip(*parts):
        if any(x != level[0] for x in level):
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, Tensor) else None


def _pools_globally(node: fx.Node) -> bool:
    """Whether ``node`` turns a feature map with several positions into one with a single position."""
    out = _shape(node)
    if out is None or len(out) < 3 or any(d != 1 for d in out[2:]):
        return False
    sizes = [s for s in (_shape(n) for n in node.all_input_nodes) if s is not None and len(s) == len(out)]
    return any(math.prod(s[2:]) > 1 for s in sizes)


_ATTENTION_FUNCTIONS = {torch.softmax, torch.nn.functional.softmax, torch.nn.functional.scaled_dot_product_attention}


def _attends(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is the core of an attention: a softmax (function, method or ``nn.Softmax``) or
    ``scaled_dot_product_attention``."""
    if node.op == "call_function":
        return node.target in _ATTENTION_FUNCTIONS
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Softmax)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


@dataclass
class _Add:
    node: int
    branch: int  # exclusive ancestors of the branch operand (bitset over node indices)
    shortcut: int  # exclusive ancestors of the shortcut operand
    common: int  # ancestors of both operands
    shape: tuple[int, ...]


class _Graph:
    """Node indices, ancestor bitsets and conv masks of a graph."""

    def __init__(self, graph: fx.Graph, model: nn.Module) -> None:
        self.nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.ancestors: list[int] = []
        self.from_input: list[bool] = []
        self.conv_mask = 0
        self.spatial_mask = 0
        self.linear_mask = 0
        self.attention_mask = 0  # nodes that mix tokens by attention (softmax, scaled_dot_product_attention)
        self.pool_mask = 0  # nodes other than convs that reduce a feature map to one position (global pooling)
        modules = dict(model.named_modules())
        for i, n in enumerate(self.nodes):
            anc = 1 << i
            from_input = n.op == "placeholder"
            for inp in n.all_input_nodes:
                anc |= self.ancestors[index[inp]]
                from_input |= self.from_input[index[inp]]
            self.ancestors.append(anc)
            self.from_input.append(from_input)
            if n.op == "call_module" and isinstance(modules.get(str(n.target)), nn.Conv2d):
                self.conv_mask |= 1 << i
                if any(k > 1 for k in modules[str(n.target)].kernel_size):
                    self.spatial_mask |= 1 << i
            elif n.op == "call_module" and isinstance(modules.get(str(n.target)), nn.Linear):
                self.linear_mask |= 1 << i
            elif _attends(n, modules):
                self.attention_mask |= 1 << i
            elif _pools_globally(n):
                self.pool_mask |= 1 << i
        self.index = index

    def conv_count(self, mask: int) -> tuple[int, int]:
        return (mask & self.conv_mask).bit_count(), (mask & self.spatial_mask).bit_count()

    def conv_paths(self, mask: int) -> tuple[str, ...]:
        return tuple(str(self.nodes[i].target) for i in _bits(mask & self.conv_mask))

    def linear_paths(self, mask: int) -> tuple[str, ...]:
        return tuple(str(self.nodes[i].target) for i in _bits(mask & self.linear_mask))

    def layer_count(self, mask: int) -> tuple[int, int, int]:
        """Convs, spatial convs, then Linear layers in ``mask``: convs decide a branch first, so a CNN block's
        Linear layers (an SE gate's) never change which side is its branch."""
        return (*self.conv_count(mask), (mask & self.linear_mask).bit_count())


def _structural_add(g: _Graph, i: int) -> tuple[int, int, int] | None:
    """``(branch, shortcut, common)`` ancestor masks if node ``i`` is a residual add as far as the graph's
    structure alone tells (shapes not looked at)."""
    node = g.nodes[i]
    if not _is_add(node) or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    ia, ib = g.index[a], g.index[b]
    if not (g.from_input[ia] and g.from_input[ib]):
        return None
    anc_a, anc_b = g.ancestors[ia], g.ancestors[ib]
    common = anc_a & anc_b
    if not common:
        return None
    only_a, only_b = anc_a & ~anc_b, anc_b & ~anc_a
    count_a, count_b = g.layer_count(only_a), g.layer_count(only_b)
    if count_a == count_b:
        return None  # no conv or Linear on either side, or two symmetric branches: not a residual block
    return (only_a, only_b, common) if count_a > count_b else (only_b, only_a, common)


def _residual_add(g: _Graph, i: int) -> _Add | None:
    masks = _structural_add(g, i)
    if masks is None:
        return None
    node = g.nodes[i]
    shape = _shape(node)
    if shape is None or _shape(node.args[0]) != shape or _shape(node.args[1]) != shape:
        return None  # broadcasting adds (biases, embeddings) are not residual
    if len(shape) < 3:
        return None  # vectors (a context or gate carried across blocks), not feature maps
    if all(d == 1 for d in shape[2:]) and masks[0] & g.pool_mask and masks[1] & g.pool_mask:
        return None  # the same, kept as (N, C, 1, 1): both sides globally pooled (a block's shortcut never is)
    return _Add(i, *masks, shape)


def last_candidate_add(graph: fx.Graph, model: nn.Module) -> fx.Node | None:
    """The last node that may be a residual add, judged from the graph's structure alone.

    :func:`find_stages` reads shapes only up to that node, so shape propagation can stop there: in a
    transformer (no conv on any branch) it need not run at all, and heads after the last residual
    stage are never evaluated.
    """
    g = _Graph(graph, model)
    return next((g.nodes[i] for i in reversed(range(len(g.nodes))) if _structural_add(g, i) is not None), None)


def _block_path(g: _Graph, a: _Add, add_mask: int, sole_add_in_module: bool) -> str:
    """The module that is the block: the one performing the add when it performs no other residual
    add (torchvision's ``Bottleneck``), else the deepest module holding branch and shortcut (a user's
    ``for f in self.blocks: x = x + f(x)`` loop performs every block's add in one module)."""
    region = [p for p in (module_path(g.nodes[i]) for i in _bits((a.branch | a.shortcut) & ~add_mask)) if p]
    inner = common_prefix(region) if region else ""
    adder = module_path(g.nodes[a.node])
    if sole_add_in_module and adder and within(inner, adder):
        return adder
    return inner


def _entry_before_chain(g: _Graph, first: _Add, block_path: str) -> bool:
    """Whether the code before a chain's first residual block (the add ``first`` of module ``block_path``) is
    the stage's non-residual entry block rather than the stem: the last conv it runs outputs the stage's shape
    and lies in a sibling of the block inside the block's container (not the root)."""
    convs = first.common & g.conv_mask
    container = block_path.rpartition(".")[0]
    if not convs or not container:
        return False
    last = g.nodes[convs.bit_length() - 1]
    path = str(last.target)
    if _shape(last) != first.shape or not path.startswith(container + "."):
        return False
    sibling = path[len(container) + 1 :].split(".")[0]
    return sibling != block_path[len(container) + 1 :].split(".")[0]


def _nesting(adds: list[_Add]) -> list[int | None]:
    """Which block each residual add lies inside: per add, the index of the innermost add whose branch holds it
    (blocks nest: EDSR's global skip, Res2Net's hierarchical adds), else ``None``."""
    enclosing: list[int | None] = []
    for a in adds:
        outers = [j for j, b in enumerate(adds) if (b.branch >> a.node) & 1]
        enclosing.append(min(outers, key=lambda j: adds[j].node) if outers else None)
    return enclosing


def _predecessors(adds: list[_Add], enclosing: list[int | None]) -> list[int | None]:
    """Each block's previous block in its chain: the latest residual add both its operands depend on, inside the
    same enclosing block (``enclosing``, from :func:`_nesting`), else ``None``."""
    add_mask = sum(1 << a.node for a in adds)
    position = {a.node: k for k, a in enumerate(adds)}
    predecessor: list[int | None] = []
    for a, outer in zip(adds, enclosing):
        scope = adds[outer].branch if outer is not None else -1
        candidates = a.common & add_mask & scope
        predecessor.append(position[candidates.bit_length() - 1] if candidates else None)
    return predecessor


def _same_stream(g: _Graph, a: _Add, b: _Add) -> bool:
    """Whether two chained blocks are of one stage: their outputs have one shape, or, when one of them has no conv
    on its branch (a token block), one batch size and number of elements, so that a stage of token blocks survives
    reshapes and permutes between its blocks (Swin's attention adds ``(N, H, W, C)``, its MLP adds
    ``(N, H*W, C)``; a channels-last MLP between two conv blocks)."""
    if a.shape == b.shape:
        return True
    tokens = not (a.branch & g.conv_mask) or not (b.branch & g.conv_mask)
    return tokens and a.shape[0] == b.shape[0] and math.prod(a.shape) == math.prod(b.shape)


def _stage_runs(g: _Graph, adds: list[_Add], predecessor: list[int | None]) -> list[list[int]]:
    """The stages as lists of block indices: chains of consecutive blocks (each with its predecessor, from
    :func:`_predecessors`) of one output shape (see :func:`_same_stream`), in execution order of their first blocks."""
    parent = list(range(len(adds)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for k, p in enumerate(predecessor):
        if p is not None and _same_stream(g, adds[p], adds[k]):
            parent[find(k)] = find(p)
    members: dict[int, list[int]] = {}
    for k in range(len(adds)):
        members.setdefault(find(k), []).append(k)
    return sorted(members.values(), key=lambda ks: adds[ks[0]].node)


def _blocks(
    g: _Graph, adds: list[_Add], enclosing: list[int | None], predecessor: list[int | None], runs: list[list[int]]
) -> list[Block]:
    """The :class:`Block` of each residual add; its branch convs leave out those of nested multi-block stages."""
    add_mask = sum(1 << a.node for a in adds)
    # A module whose forward performs exactly one residual add (at its nesting level) is that block.
    scopes = [(module_path(g.nodes[a.node]), outer) for a, outer in zip(adds, enclosing)]
    in_multi_stage = [False] * len(adds)
    for ks in runs:
        for k in ks:
            in_multi_stage[k] = len(ks) > 1
    blocks: list[Block] = []
    for k, a in enumerate(adds):
        own = a.branch
        for j, inner in enumerate(adds):
            if in_multi_stage[j] and (a.branch >> inner.node) & 1:
                own &= ~inner.branch
        blocks.append(
            Block(
                index=k,
                add=g.nodes[a.node].name,
                path=_block_path(g, a, add_mask, scopes.count(scopes[k]) == 1),
                convs=g.conv_paths(own),
                shortcut_convs=g.conv_paths(a.shortcut),
                output_shape=a.shape,
                predecessor=predecessor[k],
                linears=g.linear_paths(own),
                attention=bool(own & g.attention_mask),
            )
        )
    return blocks


def _has_entry(g: _Graph, first: _Add, pred: _Add | None, first_path: str) -> bool:
    """Whether a non-residual entry block precedes the stage whose first residual add is ``first`` (of module
    ``first_path``; ``pred``: its predecessor's add): convs between the two produce the stage's shape, or, at the
    start of a chain, :func:`_entry_before_chain`."""
    fork = first.common.bit_length() - 1  # latest node both operands depend on: the block input
    if _shape(g.nodes[fork]) != first.shape:
        return False
    if pred is None:
        return _entry_before_chain(g, first, first_path)
    return bool(first.common & ~g.ancestors[pred.node] & g.conv_mask)


def find_stages(graph: fx.Graph, model: nn.Module) -> tuple[list[Block], list[Stage]]:
    """Finds the residual blocks and stages of a traced graph whose nodes carry ``meta["val"]``.

    Composes the passes over the residual adds: :func:`_nesting`, :func:`_predecessors`, :func:`_stage_runs`,
    then the blocks (:func:`_blocks`) and each stage's entry (:func:`_has_entry`).

    Args:
        graph: Graph traced from ``model`` with shapes propagated.
        model: The traced model (used to tell convs apart from other leaf modules).

    Returns:
        All residual blocks in execution order, and the stages (including one-block stages).
    """
    g = _Graph(graph, model)
    adds = [a for a in (_residual_add(g, i) for i in range(len(g.nodes))) if a is not None]
    enclosing = _nesting(adds)
    predecessor = _predecessors(adds, enclosing)
    runs = _stage_runs(g, adds, predecessor)
    blocks = _blocks(g, adds, enclosing, predecessor, runs)
    stages = []
    for ks in runs:
        stage_blocks = tuple(blocks[k] for k in ks)
        pred = predecessor[ks[0]]
        stages.append(
            Stage(
                path=common_prefix([b.path for b in stage_blocks]) if len(ks) > 1 else stage_blocks[0].path,
                shape=adds[ks[0]].shape,
                blocks=stage_blocks,
                has_entry=_has_entry(g, adds[ks[0]], None if pred is None else adds[pred], stage_blocks[0].path),
            )
        )
    return blocks, stages
