"""Analysis of model code written elsewhere (issue 14): vector additions beside residual blocks, convs with
parametrized or already tied weights, and the argument checks of ``sharify``/``plan``/``apply_plan``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharify
from tests.foreign_nets import CifarResNet

X = torch.randn(2, 3, 32, 32)

# Two stages of three CIFAR basic blocks (8 then 16 channels, no conv bias): ShaResNet shares each stage's three
# conv2 (the downsampling block's conv2 is 16->16 stride 1 like the others), saving two of three in each stage.
EXPECTED_SAVED = 2 * (8 * 8 * 9) + 2 * (16 * 16 * 9)
EXPECTED_MEMBERS = [tuple(f"layers.{i}.{b}.conv2" for b in range(3)) for i in range(2)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- 1. additions that are not residual blocks ------------------------------------------------------------------


@pytest.mark.parametrize("context", [None, "gate", "sum"])
def test_vector_additions_across_blocks_neither_form_blocks_nor_split_stages(context: str | None) -> None:
    model = CifarResNet(context=context)
    plan = sharify.plan(model, example_inputs=X)
    assert [(s.path, len(s.blocks)) for s in plan.stages] == [("layers.0", 3), ("layers.1", 3)]
    assert [g.members for g in plan.groups] == EXPECTED_MEMBERS
    assert plan.params_saved == EXPECTED_SAVED
    shared = sharify.sharify(model, example_inputs=X)
    assert n_params(shared) == n_params(model) - EXPECTED_SAVED == plan.params_after
