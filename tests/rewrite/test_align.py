"""Channel alignment (``align=True``): which channels are free, that permuting them keeps the model's
function, and that it finds the permutation relating members that are copies of one another."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import sharify
from sharify.rewrite.align import ChannelSlot, alignment
from tests.conftest import state_equal
from tests.nets import cifar_resnet, wide_resnet

X32 = torch.randn(2, 3, 32, 32)


def _bottleneck_net() -> nn.Module:
    # A narrow ResNet-50-style network: conv2 of a bottleneck has free input and output channels.
    return torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [2, 3, 1, 1], width_per_group=16).eval()


def _permute(conv_in: nn.Conv2d, norm: nn.BatchNorm2d, conv_out: nn.Conv2d, order: torch.Tensor) -> None:
    """The function-preserving permutation of the channels from ``conv_in`` through ``norm`` to ``conv_out``."""
    with torch.no_grad():
        conv_in.weight.copy_(conv_in.weight[order])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, name).copy_(getattr(norm, name)[order])
        conv_out.weight.copy_(conv_out.weight[:, order])


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def test_slots_found_structurally() -> None:
    basic = sharify.plan(cifar_resnet(20), example_inputs=X32, align=True)
    slot_in, slot_out = basic.groups[0].slots[1]
    assert slot_in == ChannelSlot("layer1.1.conv1", "layer1.1.conv2", ("layer1.1.bn1",))
    assert slot_out is None  # conv2 -> bn2 -> residual add: the stage's channels, not free
    bottleneck = sharify.plan(_bottleneck_net(), example_inputs=X32, align=True)
    assert bottleneck.groups[0].slots[0] == (
        ChannelSlot("layer1.0.conv1", "layer1.0.conv2", ("layer1.0.bn1",)),
        ChannelSlot("layer1.0.conv2", "layer1.0.conv3", ("layer1.0.bn2",)),
    )
    preact = sharify.plan(wide_resnet(22, 2), example_inputs=X32, align=True, skip_first_block=True)
    assert preact.groups[0].slots[0] == (ChannelSlot("blocks.0.1.conv1", "blocks.0.1.conv2", ("blocks.0.1.bn2",)), None)
    assert sharify.plan(cifar_resnet(20), example_inputs=X32).groups[0].slots == ()  # only computed when asked


def _aligned_copy(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every tensor the alignment moves assigned (nothing shared), and the moves."""
    plan = sharify.plan(model, example_inputs=x, align=True)
    modules = dict(model.named_modules())
    values, orders = alignment([(g.members, g.slots) for g in plan.groups], lambda p, n: getattr(modules[p], n, None))
    aligned = copy.deepcopy(model)
    with torch.no_grad():
        for path, tensors in values.items():
            for name, value in tensors.items():
                getattr(aligned.get_submodule(path), name).copy_(value)
    return aligned, len(orders)


@pytest.mark.parametrize("build", [lambda: cifar_resnet(20).eval(), _bottleneck_net])
def test_alignment_preserves_the_function(build) -> None:
    model = build()
    _randomise_norms(model)
    aligned, moved = _aligned_copy(model, X32)
    assert moved and not state_equal(model, aligned)  # random members: channels move
    torch.testing.assert_close(aligned(X32), model(X32), rtol=1e-4, atol=1e-5)


# timm: BatchNorm + act layers (resnet26d), in-slots only (dla34), ScaledStdConv2d + scaled activations
# (nf_resnet26), GroupNorm (resnetv2_26x1_bit: grouped normalisation is not per channel, so nothing moves)
@pytest.mark.parametrize(("name", "moves"), [("resnet26d", True), ("dla34", True), ("nf_resnet26", True),
                                             ("resnetv2_50x1_bit", False)])  # fmt: skip
def test_alignment_preserves_timm_models(name: str, moves: bool) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    aligned, moved = _aligned_copy(model, x)
    assert bool(moved) == moves
    torch.testing.assert_close(aligned(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["average", "scaled", "first"])
@pytest.mark.parametrize("build", [lambda: cifar_resnet(20).eval(), _bottleneck_net])
def test_members_equal_up_to_a_permutation_are_recovered_exactly(build, init: str) -> None:
    # Each stage's members get one weight, then every block's free channels a random function-preserving
    # permutation: the blocks now differ, the model computes what it did. Plain averaging mixes unrelated
    # channels; aligning first finds the permutations and shares exactly.
    model = build()
    _randomise_norms(model)
    plan = sharify.plan(model, example_inputs=X32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for group in plan.groups:
            first = model.get_submodule(group.members[0]).weight.clone()
            for path in group.members:
                model.get_submodule(path).weight.copy_(first)
    expected = model(X32)
    for block in (m for m in model.modules() if hasattr(m, "conv2") and hasattr(m, "bn1")):
        c = block.conv2.in_channels
        _permute(block.conv1, block.bn1, block.conv2, torch.randperm(c, generator=g))
        if hasattr(block, "conv3"):
            _permute(block.conv2, block.bn2, block.conv3, torch.randperm(c, generator=g))
    torch.testing.assert_close(model(X32), expected, rtol=1e-4, atol=1e-5)

    plain = sharify.sharify(model, example_inputs=X32, init=init)
    aligned = sharify.sharify(model, example_inputs=X32, init=init, align=True)
    assert (plain(X32) - expected).abs().max() > 1e-2
    torch.testing.assert_close(aligned(X32), expected, rtol=1e-4, atol=1e-4)
    dissimilarity = [g.dissimilarity for g in sharify.report(model, aligned).groups]
    assert max(dissimilarity) < 1e-5  # the report compares like channels
    assert min(g.dissimilarity for g in sharify.report(model, plain).groups) > 0.3


def test_align_changes_no_arithmetic_and_lowers_the_error_of_random_members() -> None:
    model = cifar_resnet(20).eval()
    plain = sharify.sharify(model, example_inputs=X32)
    aligned = sharify.sharify(model, example_inputs=X32, align=True)
    assert sum(p.numel() for p in aligned.parameters()) == sum(p.numel() for p in plain.parameters())
    err = [sum(g.dissimilarity for g in sharify.report(model, m).groups) for m in (plain, aligned)]
    assert err[1] < err[0]
    assert aligned.sharify_shared.options["align"] is True
    assert set(aligned.sharify_shared.alignment) <= {n for n, _ in model.named_modules()}


def test_align_with_basis_svd_lowers_the_reconstruction_error() -> None:
    model = cifar_resnet(20).eval()
    opts = {"method": "basis", "init": "svd", "shared_rank": 16, "unique_rank": 8, "example_inputs": X32}
    errors = [
        sum(g.dissimilarity for g in sharify.report(model, sharify.sharify(model, align=a, **opts)).groups)
        for a in (False, True)
    ]
    assert errors[1] < errors[0]


def test_align_is_transactional_and_leaves_the_caller_model_untouched(monkeypatch) -> None:
    model = cifar_resnet(20).eval()
    before = copy.deepcopy(model)
    sharify.sharify(model, example_inputs=X32, align=True)
    assert state_equal(model, before)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(sharify.rewrite.apply, "attach_to_holder", fail)
    with pytest.raises(RuntimeError, match="injected"):
        sharify.sharify(model, example_inputs=X32, align=True, inplace=True)
    assert state_equal(model, before)


def test_align_bad_input() -> None:
    model = cifar_resnet(20)
    with pytest.raises(ValueError, match=r"align=True .* init='random' does not use the members' weights"):
        sharify.sharify(model, example_inputs=X32, align=True, init="random")
    with pytest.raises(TypeError, match="align must be True or False"):
        sharify.plan(model, example_inputs=X32, align="yes")  # type: ignore[arg-type]
    aligned = sharify.sharify(model, example_inputs=X32, align=True)
    with pytest.raises(ValueError, match=r"align=True.*load the checkpoint into the original model and sharify that"):
        sharify.load_unshared_state_dict(aligned, model.state_dict())


def test_align_on_the_meta_device_and_round_trip(tmp_path) -> None:
    with torch.device("meta"):
        meta = torchvision.models.resnet18()
    assert sharify.sharify(meta, align=True).sharify_shared.alignment == {}  # no values to align
    model = cifar_resnet(20).eval()
    shared = sharify.sharify(model, example_inputs=X32, init="scaled", align=True)
    path = tmp_path / "aligned.safetensors"
    sharify.save(shared, path)
    restored = sharify.load(path, model=cifar_resnet(20))
    assert state_equal(restored.eval(), shared)
    torch.testing.assert_close(restored(X32), shared(X32))
