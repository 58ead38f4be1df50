"""What sharing still saves after conv-BN folding, the usual deployment step.

Folding a BatchNorm into the conv before it replaces the conv's weight by ``W * gamma / sigma``
(and adds a bias). The BatchNorm of each block has its own statistics, so a shared conv whose
output goes straight into a BatchNorm gets a different folded weight in every block: folding
re-materialises one weight per such member. Members followed by something else (the residual
addition in pre-activation blocks, a concatenation in filter-basis convs) stay shared.

The conv -> BatchNorm pairs are found structurally on the torch.fx graph of the sharified model,
the pattern torch.fx's own ``fuse`` pass folds: a member conv whose only user is a BatchNorm.
"""

from __future__ import annotations

import logging

from torch import nn

from ..errors import SharifyError
from ..layers import shared_groups
from .tracing import module_path, trace

__all__ = ["bn_folded_members"]

logger = logging.getLogger(__name__)


def _is_batchnorm(module: nn.Module | None) -> bool:
    # FrozenBatchNorm2d (torchvision, timm) is not a _BatchNorm subclass but folds the same way.
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__ == "FrozenBatchNorm2d"


def bn_folded_members(shared: nn.Module) -> set[str] | None:
    """Member convs whose output goes only into a BatchNorm, so that folding gives each its own weight.

    The BatchNorm may be a module (``nn.BatchNorm2d``, timm's ``BatchNormAct2d``) or the ops traced
    inside a ``FrozenBatchNorm2d``. Members inside submodules that cannot be traced count as not
    folded.

    Args:
        shared: A sharified model.

    Returns:
        The members' module paths, or ``None`` when the model cannot be traced.

    Example:
        >>> import torchvision, sharify
        >>> from sharify.analysis.folding import bn_folded_members
        >>> sorted(bn_folded_members(sharify.sharify(torchvision.models.resnet18())))[:2]
        ['layer1.0.conv2', 'layer1.1.conv2']
    """
    members = {p for _, paths in shared_groups(shared).values() for p in paths}
    try:
        graph = trace(shared).graph
    except SharifyError as exc:
        logger.info("cannot trace %s to find conv-BN pairs: %s", type(shared).__name__, exc)
        return None
    modules = dict(shared.named_modules())
    folded = set()
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in members and len(node.users) == 1:
            (user,) = node.users
            if _is_batchnorm(modules.get(module_path(user))):
                folded.add(str(node.target))
    return folded
