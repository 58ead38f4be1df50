"""init="scaled": one shared tensor plus per-member per-output-channel gains (issue 6's library feature)."""

from __future__ import annotations

import torch

import sharify
from sharify.rewrite.init import initial_tensors, scaled_tensors
from tests.nets import cifar_resnet, wide_resnet

X = torch.randn(4, 3, 32, 32)


def _error(weights, shared, gains) -> float:
    return sum(((g.view(-1, 1, 1, 1) * shared - w).norm() / w.norm()).item() for w, g in zip(weights, gains))


def test_scaled_tensors_exact_on_scaled_copies_and_better_than_average() -> None:
    torch.manual_seed(0)
    base = torch.randn(16, 8, 3, 3)
    gains = [torch.rand(16) * 2 + 0.1, -torch.rand(16) - 0.5, torch.randn(16)]
    weights = [g.view(-1, 1, 1, 1) * base for g in gains]
    shared, bias, found = scaled_tensors(weights, [None] * 3)
    assert bias is None and _error(weights, shared, found) < 1e-5
    average, _ = initial_tensors(weights, [None] * 3, "average")
    assert _error(weights, average, [torch.ones(16)] * 3) > 0.5
    noisy = [w + 0.3 * torch.randn_like(w) for w in weights]
    shared, _, found = scaled_tensors(noisy, [None] * 3)
    average, _ = initial_tensors(noisy, [None] * 3, "average")
    assert _error(noisy, shared, found) < _error(noisy, average, [torch.ones(16)] * 3)


def test_scaled_init_folds_gains_into_batchnorm_exactly() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    with torch.no_grad():  # members: scaled copies of one tensor (with sign flips), BatchNorms with real stats
        for layer in (model.layer1, model.layer2, model.layer3):
            base = layer[0].conv2.weight.clone()
            for block in layer:
                gain = (torch.rand(base.shape[0], 1, 1, 1) * 2 + 0.2) * torch.randn(base.shape[0], 1, 1, 1).sign()
                block.conv2.weight.copy_(gain * base)
                block.bn2.running_mean.uniform_(-1, 1)
                block.bn2.running_var.uniform_(0.5, 2)
    expected = model(X)
    scaled = sharify.sharify(model, init="scaled", example_inputs=X).eval()
    average = sharify.sharify(model, init="average", example_inputs=X).eval()
    torch.testing.assert_close(scaled(X), expected, rtol=1e-4, atol=1e-4)
    assert (average(X) - expected).abs().max() > 1e-2
    assert not any("shared_gain" in k for k in scaled.state_dict())  # zero extra parameters
    report = sharify.report(model, scaled)
    assert report.params_after == sharify.plan(model, init="scaled", example_inputs=X).params_after
    assert max(g.dissimilarity for g in report.groups) < 1e-5


def test_scaled_init_without_batchnorm_uses_member_gains() -> None:
    torch.manual_seed(0)
    model = wide_resnet(16, 2).eval()  # pre-activation: conv2 feeds the residual add, no BatchNorm
    with torch.no_grad():
        for stage in model.blocks:
            for block in stage:
                block.conv2.weight.copy_(torch.linspace(0.5, 2, block.conv2.out_channels).view(-1, 1, 1, 1)
                                         * stage[0].conv2.weight)  # fmt: skip
    shared = sharify.sharify(model, init="scaled", example_inputs=X).eval()
    gains = [k for k in shared.state_dict() if k.endswith("shared_gain")]
    assert gains == [f"blocks.{s}.{b}.conv2.shared_gain" for s in range(3) for b in range(2)]
    torch.testing.assert_close(shared(X), model(X), rtol=1e-4, atol=1e-4)
    plan = sharify.plan(model, init="scaled", example_inputs=X)
    assert sum(p.numel() for p in shared.parameters()) == plan.params_after
    assert sum(g.gains for g in plan.groups) == 2 * (32 + 64 + 128)
    plain = sharify.unshare(shared).eval()
    torch.testing.assert_close(plain(X), shared(X))
    assert not any("shared_gain" in k for k in plain.state_dict())
