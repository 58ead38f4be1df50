"""Initial values of a shared tensor from the members' current tensors.

Each strategy takes the members' weights (and biases) and returns the shared weight (and bias):

* ``"average"``: the mean of the members (with pretrained weights: the paper's averaged init);
* ``"first"``: the first member's tensors (in execution order);
* ``"random"``: a fresh draw of ``nn.Conv2d``'s default initialisation;
* ``"scaled"``: a shared tensor ``W`` plus per-member, per-output-channel gains ``a_i`` minimising
  ``sum_i ||diag(a_i) W - W_i||^2`` (:func:`scaled_tensors`), so that each block keeps its own filter
  gains; the rewrite folds each ``a_i`` into the BatchNorm that follows the member (zero extra
  parameters) or, where none follows, gives the member a ``shared_gain`` parameter. A folded gain lives
  in the BatchNorm's running statistics (and its sign in the BatchNorm weight): a BatchNorm in train
  mode, or re-calibrated, normalises the magnitude away again, so there ``"scaled"`` differs from
  ``"average"`` by the choice of ``W`` and the signs.

None of them makes a model whose blocks were trained independently compute what it computed before:
the members' filters are not similar (``sharify.report``'s dissimilarity shows how far apart), and
fine-tuning, or BatchNorm re-calibration as a first step, has to adapt the network
(``benchmarks/results/accuracy_study``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["INITS", "initial_tensors", "scaled_tensors"]


def _average(tensors: Sequence[Tensor]) -> Tensor:
    total = torch.zeros_like(tensors[0], dtype=torch.float64 if tensors[0].is_floating_point() else None)
    for t in tensors:
        total += t
    return (total / len(tensors)).to(tensors[0].dtype)


def _first(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0].clone()


def _random_weight(tensors: Sequence[Tensor]) -> Tensor:
    weight = torch.empty_like(tensors[0])
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d.reset_parameters
    return weight


def _random_bias(biases: Sequence[Tensor], weight: Tensor) -> Tensor:
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    return torch.empty_like(biases[0]).uniform_(-bound, bound)


#: Name -> function of the members' tensors.
INITS: dict[str, Callable[[Sequence[Tensor]], Tensor]] = {
    "average": _average,
    "first": _first,
    "random": _random_weight,
}


def scaled_tensors(
    weights: Sequence[Tensor], biases: Sequence[Tensor | None]
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Shared weight (and bias) with per-member per-output-channel gains: the ``"scaled"`` init.

    For each output channel ``c`` the members' filters ``W_i[c]`` are stacked as the rows of an
    ``n x d`` matrix; its best rank-1 approximation ``a[c] w[c]^T`` (top singular pair) is the exact
    minimiser of ``sum_i ||a_i[c] w[c] - W_i[c]||^2``. Gains are normalised to a root mean square of 1
    over the members (and a positive mean), so ``W`` keeps the members' scale.

    Returns:
        ``(W, shared bias, [a_i])``; each ``a_i`` has ``C_out`` entries. Biases, if any, are shared
        as the mean of ``b_i / a_i``, so that a member computes ``a_i * (W x + b)``.
    """
    with torch.no_grad():
        stacked = torch.stack([w.detach().flatten(1).double() for w in weights], 1)  # (C_out, n, d)
        u, sv, vh = torch.linalg.svd(stacked, full_matrices=False)
        gains = u[:, :, 0] * sv[:, :1]  # (C_out, n)
        direction = vh[:, 0, :]  # (C_out, d)
        rms = gains.square().mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        sign = torch.where(gains.mean(1, keepdim=True) < 0, -1.0, 1.0).double()
        gains = gains / (rms * sign)
        shared = direction * (rms * sign)
        dtype = weights[0].dtype
        weight = shared.view_as(weights[0]).to(dtype)
        per_member = [g.to(dtype).contiguous() for g in gains.T]
        present = [b for b in biases if b is not None]
        bias = None
        if present:
            safe = [torch.where(a.abs() < 1e-8, torch.ones_like(a), a) for a in per_member]
            bias = torch.stack([b.detach() / a for b, a in zip(present, safe)]).mean(0)
    return weight, bias, per_member


def check_init(init: str) -> str:
    """Checks an init that combines tensors alone (``"scaled"`` also rewrites the model around them)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(map(repr, INITS))}")
    return init


def initial_tensors(
    weights: Sequence[Tensor], biases: Sequence[Tensor | None], init: str
) -> tuple[Tensor, Tensor | None]:
    """Shared ``(weight, bias)`` for a group from its members' tensors (which are not modified).

    Args:
        weights: The members' weights, in execution order.
        biases: The members' biases (all ``None`` for convs without bias).
        init: One of :data:`INITS` (``"scaled"`` goes through :func:`scaled_tensors`).
    """
    check_init(init)
    with torch.no_grad():
        weight = INITS[init]([w.detach() for w in weights])
        present = [b.detach() for b in biases if b is not None]
        if not present:
            return weight, None
        bias = _random_bias(present, weight) if init == "random" else INITS[init](present)
    return weight, bias
