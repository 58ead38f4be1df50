"""Initial values of a shared tensor from the members' current tensors.

Each strategy takes the members' weights (and biases) and returns the shared weight (and bias):

* ``"average"``: the mean of the members (with pretrained weights: the paper's averaged init);
* ``"first"``: the first member's tensors (in execution order);
* ``"random"``: a fresh draw of ``nn.Conv2d``'s default initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["INITS", "initial_tensors"]


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


def check_init(init: str) -> str:
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
        init: One of :data:`INITS`.
    """
    check_init(init)
    with torch.no_grad():
        weight = INITS[init]([w.detach() for w in weights])
        present = [b.detach() for b in biases if b is not None]
        if not present:
            return weight, None
        bias = _random_bias(present, weight) if init == "random" else INITS[init](present)
    return weight, bias
