"""A reference implementation of relaxed sharing for the benchmark: the delta applied to the activations.

The library's member conv (:class:`sharify.layers.SharedConvMixin`) materialises its weight once per forward,
``gain * (W + (B @ A).view_as(W))``, and runs one convolution. The alternative measured against it here runs
the shared convolution and the delta as two more convolutions over the activations::

    y = conv(x, gain * W) + conv1x1(conv_kxk(x, A), gain * B)

``A`` (``(r, in/groups * kh * kw)``) becomes a conv with ``r`` output channels per group and the member's
kernel, stride, padding and dilation; ``B`` (``(out, r)``) a 1x1 conv. With ``groups > 1`` the rows of ``A``
apply to every group's input channels (``A`` repeated per group, then a grouped 1x1 conv with ``B``), which is
what ``(B @ A).view_as(W)`` computes. Both give the same outputs (up to rounding); only the cost differs. This
lives in the benchmark only: it is not the library's forward.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sharify

__all__ = ["ActivationDelta", "activation_delta", "max_difference"]


class ActivationDelta(nn.Module):
    """Runs a member conv with a low-rank delta as three convolutions over the activations.

    Args:
        conv: A member conv (``sharify.is_shared_conv``) of class ``nn.Conv2d`` that owns a delta
            (``delta_rank > 0``). It stays a submodule, so its delta and gain remain parameters of the model.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not sharify.is_shared_conv(conv) or getattr(conv, "_sharify_base", None) is not nn.Conv2d:
            raise TypeError(f"ActivationDelta needs a member conv of class nn.Conv2d, got {type(conv).__name__}")
        if not getattr(conv, "delta_rank", 0):
            raise ValueError("ActivationDelta needs a member conv with a low-rank delta (delta_rank > 0)")
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        params = conv._parameters
        w: Tensor = conv._sharify_holder.weight  # type: ignore[union-attr]
        up, down, gain = params["delta_b"], params["delta_a"], params.get("shared_gain")
        assert up is not None and down is not None
        if gain is not None:
            w = w * gain.view(-1, 1, 1, 1)
            up = up * gain.view(-1, 1)
        rank, groups = down.shape[0], conv.groups
        a = down.view(rank, *w.shape[1:])
        if groups > 1:
            a = a.repeat(groups, 1, 1, 1)  # (groups * r, in/groups, kh, kw): each group's inputs through A
        main = conv._conv_forward(x, w, conv.bias)
        low = conv._conv_forward(x, a, None)
        return main + F.conv2d(low, up.reshape(up.shape[0], rank, 1, 1), groups=groups)

    def extra_repr(self) -> str:
        return f"rank={self.conv.delta_rank}"


def activation_delta(model: nn.Module) -> nn.Module:
    """A deep copy of a sharified ``model`` whose members with a delta run as :class:`ActivationDelta`.

    Members without a delta (rank 0 under a ``param_budget``) are left as they are. The copy's parameters are
    the same tensors' copies (shared weights still once), so an optimizer sees the same parameter count.
    """
    model = copy.deepcopy(model)
    paths = [path for path, m in model.named_modules() if sharify.is_shared_conv(m) and getattr(m, "delta_rank", 0)]
    for path in paths:
        model.set_submodule(path, ActivationDelta(model.get_submodule(path)))  # type: ignore[arg-type]
    return model


@torch.no_grad()
def max_difference(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """Largest absolute difference of the two models' outputs on ``x`` relative to the largest output, in eval
    mode (restoring each model's mode)."""
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        ya, yb = a(x), b(x)
    finally:
        a.train(modes[0]), b.train(modes[1])
    return float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12))
