"""timm models keep working after sharify, and user-written networks share what hand arithmetic says."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import sharify
from tests.nets import FancyNet, FlatNet, LoopNet


def _conv_size(conv: nn.Conv2d) -> int:
    return conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)


@pytest.mark.parametrize("name", ["resnet50", "resnet50d", "seresnext26d_32x4d", "resnetv2_50", "regnety_008"])
def test_timm_models_share_and_keep_their_methods(name: str) -> None:
    model = timm.create_model(name, num_classes=10)
    p = sharify.plan(model)
    assert p.groups and all(len(g.members) >= 2 for g in p.groups)
    shared = sharify.sharify(model)
    r = sharify.report(model, shared)
    assert r.params_after == p.params_after == sum(q.numel() for q in shared.parameters())
    assert type(shared) is type(model) and shared.pretrained_cfg == model.pretrained_cfg
    x = torch.randn(2, 3, 64, 64)
    shared.eval()
    assert shared(x).shape == (2, 10)
    assert shared.forward_features(x).shape == model.eval().forward_features(x).shape
    shared.reset_classifier(5)
    assert shared(x).shape == (2, 5)
    matcher = shared.group_matcher()
    assert "stem" in matcher and "blocks" in matcher
    shared.set_grad_checkpointing(True)
    shared.train()
    shared(x).sum().backward()
    assert all(h.weight.grad is not None for h, _ in sharify.shared_groups(shared).values())


def test_timm_resnet50_groups_are_the_stride1_3x3_convs() -> None:
    model = timm.create_model("resnet50")
    p = sharify.plan(model)
    assert [len(g.members) for g in p.groups] == [3, 3, 5, 2]
    assert p.params_after == 20_469_800  # same architecture as torchvision's


def test_loop_net_with_data_dependent_head() -> None:
    model = LoopNet(widths=(16, 32), depth=3)
    x = torch.randn(2, 3, 16, 16)
    p = sharify.plan(model, example_inputs=x)
    assert list(p.auto_leaves) == ["head"]
    reason = p.auto_leaves["head"]
    assert reason.startswith("TraceError: ") and "control flow" in reason
    # the printed plan names the leafed head with its reason, once, after the groups
    lines = str(p).splitlines()
    assert [line for line in lines if "head" in line] == [f"  not traced (treated as a leaf): head: {reason}"]
    assert lines[-1] == f"  not traced (treated as a leaf): head: {reason}" and lines[-2] == "    branches.1.2.3"
    # hand arithmetic: in each stage the 3x3 conv of all 3 branches (with bias) share one tensor
    expected = sum(2 * _conv_size(model.branches[s][0][3]) for s in range(2))
    assert p.params_saved == expected
    shared = sharify.sharify(model, example_inputs=x)
    assert shared(x).shape == (2, 10)


def test_loop_net_first_blocks_stem_versus_entry() -> None:
    # A transition conv `downs[s]` runs before each stage's blocks, producing the stage's shape. In stage 1
    # it follows a residual block, so it is the stage's non-residual first block (an entry, as in
    # MobileNetV2) and all three residual blocks are non-first. In stage 0 nothing residual precedes it:
    # stem and `downs[0]` are the stem, the first residual block is the stage's first block (as ResNet-34's
    # layer1.0 in DSFB), and skip_first_block=True leaves it out. See sharify/residual.py.
    model = LoopNet(widths=(16, 32), depth=3)
    p = sharify.plan(model, example_inputs=torch.randn(2, 3, 16, 16), skip_first_block=True)
    assert [(s.path, s.has_entry) for s in p.stages] == [("branches.0", False), ("branches.1", True)]
    assert [g.members for g in p.groups] == [
        ("branches.0.1.3", "branches.0.2.3"),
        ("branches.1.0.3", "branches.1.1.3", "branches.1.2.3"),
    ]
    assert p.params_saved == _conv_size(model.branches[0][0][3]) + 2 * _conv_size(model.branches[1][0][3])


def test_mobilenet_v2_entry_block_before_the_first_residual_block() -> None:
    # The network's residual chain starts in a stage of two residual blocks after the non-residual 24-channel
    # entry block: that block sits beside them in their container, so it is the stage's first block and both
    # residual blocks are shared (the paper's rule). ResNet's stem, outside `layer1`, is no entry: layer1.0
    # stays first (the ResNet-34 S48U1 row).
    model = torchvision.models.mobilenet_v2(inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 3, 2], [6, 32, 3, 2]])
    p = sharify.plan(model, preset="mobilenetv2-shared")
    assert [(s.path, s.has_entry) for s in p.stages] == [("features", True), ("features", True)]
    assert [g.members for g in p.groups] == [
        ("features.3.conv.0.0", "features.4.conv.0.0"),
        ("features.6.conv.0.0", "features.7.conv.0.0"),
    ]
    # timm's MobileNetV2: the chain starts in blocks.1 (entry blocks.1.0, one residual block blocks.1.1)
    timm_plan = sharify.plan(timm.create_model("mobilenetv2_035"), preset="mobilenetv2-shared")
    stage = timm_plan.stages[0]
    assert (stage.path, stage.has_entry) == ("blocks.1.1", True)
    assert not sharify.plan(torchvision.models.resnet34(), preset="dsfb-shared").stages[0].has_entry


def test_fancy_blocks_se_layer_scale_drop_path_groupnorm_bias() -> None:
    model = FancyNet(c=16, depth=3)
    x = torch.randn(2, 3, 16, 16)
    p = sharify.plan(model, example_inputs=x)
    assert [g.members for g in p.groups] == [tuple(f"blocks.{i}.conv_b" for i in range(3))]
    assert p.params_saved == 2 * _conv_size(model.blocks[0].conv_b) and p.groups[0].signature.bias
    shared = sharify.sharify(model, example_inputs=x).train()
    shared(x).sum().backward()
    holder = shared.sharify_shared.blocks.conv_b
    assert holder.bias is not None and holder.bias.grad is not None
    # all spatial positions: conv_a and conv_b each form their own group
    p2 = sharify.plan(model, example_inputs=x, positions=("all_spatial",))
    assert sorted(g.position for g in p2.groups) == ["spatial0", "spatial1"]
    assert p2.params_saved == 2 * _conv_size(model.blocks[0].conv_a) + 2 * _conv_size(model.blocks[0].conv_b)


def test_flat_functional_net() -> None:
    model = FlatNet(c=8, depth=4)
    x = torch.randn(2, 3, 16, 16)
    p = sharify.plan(model, example_inputs=x)
    assert p.groups[0].members == ("conv2.0", "conv2.1", "conv2.2", "conv2.3")
    assert p.params_saved == 3 * model.conv2[0].weight.numel()
    p1 = sharify.plan(model, example_inputs=x, positions=("first",), skip_first_block=True)
    assert p1.groups[0].members == ("conv1.1", "conv1.2", "conv1.3")


def test_leaf_modules_option_hides_a_stage() -> None:
    model = FancyNet(c=16, depth=3)
    x = torch.randn(1, 3, 16, 16)
    assert not sharify.plan(model, example_inputs=x, leaf_modules=["blocks"]).groups
    assert not sharify.plan(model, example_inputs=x, leaf_modules=[type(model.blocks[0])]).groups
