"""Conv -> BatchNorm pairs: where an inference model can fold a BatchNorm into the conv before it.

Folding a BatchNorm into the conv before it replaces the conv's weight by ``W * gamma / sigma`` (and adds a
bias). The BatchNorm of each block has its own statistics, so torch's usual fusion gives a shared conv whose
output goes straight into a BatchNorm a different weight in every block: it re-materialises one weight per
such member. :func:`sharify.fold_batchnorm` keeps the shared weight and gives each such member a
per-output-channel scale and bias instead (:mod:`sharify.deploy.batchnorm`). Members followed by something
else (the residual addition in pre-activation blocks, a concatenation in filter-basis convs) have nothing to
fold.

The pairs are found structurally on the torch.fx graph, the pattern torch.fx's own ``fuse`` pass folds: a
conv called once whose only user is a BatchNorm called once on it alone, that normalises with running
statistics in eval mode. Module names play no part.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import fx, nn

from ..errors import SharifyError
from ..layers import scoped_key, shared_groups, shared_stores
from .tracing import TraceResult, module_path, trace

__all__ = ["bn_folded_members", "conv_bn_pairs", "is_batchnorm", "trace_for_folding"]

logger = logging.getLogger(__name__)


def is_batchnorm(module: nn.Module | None) -> bool:
    """Whether ``module`` is a BatchNorm (FrozenBatchNorm2d of torchvision and timm included)."""
    # FrozenBatchNorm2d (torchvision, timm) is not a _BatchNorm subclass but folds the same way.
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__ == "FrozenBatchNorm2d"


def _uses_running_stats(norm: nn.Module) -> bool:
    """Whether ``norm`` in eval mode normalises with stored statistics (a BatchNorm without them uses the batch's)."""
    return getattr(norm, "running_mean", None) is not None and getattr(norm, "running_var", None) is not None


def _inside(node: fx.Node, path: str) -> bool:
    where = module_path(node)
    return where == path or where.startswith(path + ".")


def conv_bn_pairs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """Every conv whose output goes only into a BatchNorm that can be folded into it, with that BatchNorm.

    A pair is a conv module called once in ``graph`` whose only user belongs to a BatchNorm module (a call of
    it, or an op traced inside it, e.g. in a ``FrozenBatchNorm2d`` or timm's ``BatchNormAct2d``) that takes
    no other input and normalises with running statistics. Convs inside leaves of the trace are not seen.

    Args:
        model: The model ``graph`` was traced from (shared or not).
        graph: Its torch.fx graph (:func:`~sharify.analysis.tracing.trace`).

    Returns:
        ``(conv path, BatchNorm path)`` in graph order.
    """
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        conv = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(conv, nn.modules.conv._ConvNd) or calls[str(node.target)] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        path = module_path(user)
        norm = modules.get(path)
        if not path or not is_batchnorm(norm) or not _uses_running_stats(norm) or calls[path] > 1:  # type: ignore[arg-type]
            continue
        inside = [user] if user.op == "call_module" else [n for n in graph.nodes if _inside(n, path)]
        inputs = {i for n in inside for i in n.all_input_nodes}
        outside = {i for i in inputs if i.op != "get_attr" and not _inside(i, path)}
        if outside == {node}:
            pairs.append((str(node.target), path))
    return pairs


def trace_for_folding(model: nn.Module) -> TraceResult:
    """Traces ``model`` as its sharing was analysed: with the recorded leaf paths and number of inputs.

    Raises:
        UntraceableError: See :func:`~sharify.analysis.tracing.trace`.
    """
    leaves: list[str] = []
    inputs = 1
    for scope, store in shared_stores(model).items():
        leaves += [scoped_key(scope, p) for p in store.analysis.get("leaf_modules", [])]
        if not scope and store.analysis.get("input_shapes"):
            inputs = len(store.analysis["input_shapes"])
    paths = {p for p, _ in model.named_modules()}
    return trace(model, [p for p in leaves if p in paths], num_inputs=inputs)


def bn_folded_members(shared: nn.Module) -> set[str] | None:
    """Member convs whose output goes only into a BatchNorm: torch's fusion would give each its own weight.

    The BatchNorm may be a module (``nn.BatchNorm2d``, timm's ``BatchNormAct2d``) or the ops traced
    inside a ``FrozenBatchNorm2d``. Members inside submodules that cannot be traced count as not
    folded.

    Args:
        shared: A sharified model.

    Returns:
        The members' module paths, or ``None`` when the model cannot be traced to the end of its forward
        (:func:`sharify.fold_batchnorm` refuses it).

    Example:
        >>> import torchvision, sharify
        >>> from sharify.analysis.folding import bn_folded_members
        >>> sorted(bn_folded_members(sharify.sharify(torchvision.models.resnet18())))[:2]
        ['layer1.0.conv2', 'layer1.1.conv2']
    """
    members = {p for _, paths in shared_groups(shared).values() for p in paths}
    try:
        result = trace_for_folding(shared)
    except SharifyError as exc:
        logger.info("cannot trace %s to find conv-BN pairs: %s", type(shared).__name__, exc)
        return None
    if result.stopped is not None:
        logger.info("no conv-BN pairs of %s: the trace stopped at %s", type(shared).__name__, result.stopped)
        return None
    return {conv for conv, _ in conv_bn_pairs(shared, result.graph) if conv in members}
