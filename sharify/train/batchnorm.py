"""BatchNorm re-calibration: fresh running statistics for a model whose convs just changed.

Sharifying replaces each member's conv weight by the group's shared tensor, so the activations
that follow no longer have the mean/variance the BatchNorm layers recorded during training. A pass
of a few hundred training images in train mode, with no gradients, re-estimates them; the
running statistics are reset and accumulated as a plain cumulative average (``momentum=None``),
and each layer's own momentum is restored afterwards. No weight changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recalibrate_batchnorm"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_images: int = 512,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    autocast: AbstractContextManager[Any] | None = None,
    sync: bool = True,
) -> int:
    """Re-estimates the running mean/var of every BatchNorm layer from ``num_images`` images.

    Args:
        model: The model (its train/eval mode is restored afterwards).
        batches: Iterable of ``(images, labels)`` or image tensors (e.g. the train loader).
        num_images: Images to use (the last batch is used whole).
        device: Device to move the images to (default: the model's).
        channels_last: Convert images to channels-last memory format.
        autocast: Optional autocast context for the forward passes.
        sync: Under ``torch.distributed``, average the statistics over ranks.

    Returns:
        The number of images used (0 when the model has no BatchNorm).

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18()
        >>> recalibrate_batchnorm(model, [torch.randn(4, 3, 64, 64)], num_images=4)
        4
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = device or next(model.parameters()).device
    was_training = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    seen = 0
    try:
        model.train()
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast or nullcontext():
                model(images)
            seen += len(images)
            if seen >= num_images:
                break
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for module, training in was_training.items():
            module.train(training)
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for m in norms:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf.div_(world)
    logger.info("re-calibrated %d BatchNorm layers on %d images", len(norms), seen)
    return seen
