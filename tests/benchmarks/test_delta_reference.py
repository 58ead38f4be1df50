"""The benchmark's reference for relaxed sharing (the delta applied to the activations) computes what the
library's member conv computes: same outputs, same gradients, same parameters, grouped convs and gains included."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import sharify
from benchmarks.cifar_models import wide_resnet
from benchmarks.delta_reference import ActivationDelta, activation_delta, max_difference


class _Block(nn.Module):
    """A residual block whose convs are grouped."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _GroupedNet(nn.Module):
    """A stem and one stage of three grouped residual blocks."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(*(_Block(8, groups) for _ in range(3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(self.stem(x)).flatten(1)


CASES = {
    "wrn, delta_rank": (lambda: wide_resnet(16, 1), {"delta_rank": 2}),
    "wrn, gains": (lambda: wide_resnet(16, 1), {"delta_rank": 2, "init": "scaled"}),
    "wrn, budget": (lambda: wide_resnet(16, 1), {"param_budget": 0.9}),
    "grouped": (_GroupedNet, {"delta_rank": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_activations_compute_what_the_materialised_weight_computes(case: str) -> None:
    make, options = CASES[case]
    shared = sharify.sharify(make(), **options)
    reference = activation_delta(shared)
    members = [m for m in shared.modules() if getattr(m, "delta_rank", 0)]
    wrapped = [m for m in reference.modules() if isinstance(m, ActivationDelta)]
    assert members and len(wrapped) == len(members)
    if case == "grouped":
        assert all(m.conv.groups == 2 for m in wrapped)
    if case == "wrn, gains":
        assert all("shared_gain" in m.conv._parameters for m in wrapped)
    x = torch.randn(2, 3, 16, 16)
    assert max_difference(shared, reference, x) < 1e-5
    # the same parameters (the shared weights once), so an optimizer steps the same tensors
    assert [p.shape for p in shared.parameters()] == [p.shape for p in reference.parameters()]
    grads = []
    for model in (shared, reference):
        model.train()
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_original_shared_model_is_untouched() -> None:
    shared = sharify.sharify(wide_resnet(16, 1), delta_rank=2)
    activation_delta(shared)
    assert not any(isinstance(m, ActivationDelta) for m in shared.modules())


def test_activation_delta_refuses_what_it_cannot_run() -> None:
    with pytest.raises(TypeError, match=r"member conv of class nn\.Conv2d"):
        ActivationDelta(nn.Conv2d(3, 3, 3))
    shared = sharify.sharify(wide_resnet(16, 1))
    member = next(m for m in shared.modules() if sharify.is_shared_conv(m))
    with pytest.raises(ValueError, match="delta_rank > 0"):
        ActivationDelta(member)  # type: ignore[arg-type]
