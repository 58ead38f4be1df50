"""sharify.report: the per-stage and per-group tables, the dissimilarity column, and misuse."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import sharify
from tests.nets import cifar_resnet

X32 = torch.randn(1, 3, 32, 32)


def test_per_stage_rows_and_per_group_rows() -> None:
    model = torchvision.models.resnet18()
    r = sharify.report(model, sharify.sharify(model, positions="all_spatial"))
    # layer1 (no downsampling block): conv1 and conv2 of both blocks form two groups of 2 x 64x64x3x3;
    # layers 2-4: the first block's conv1 changes the width and stride, so only conv2 is shared.
    size = {c: c * c * 9 for c in (64, 128, 256, 512)}
    expected = {
        "layer1": {"groups": 2, "members": 4, "params_before": 4 * size[64], "params_after": 2 * size[64]},
        **{
            f"layer{i}": {"groups": 1, "members": 2, "params_before": 2 * size[c], "params_after": size[c]}
            for i, c in ((2, 128), (3, 256), (4, 512))
        },
    }
    for s in expected.values():
        s["saved"] = s["params_before"] - s["params_after"]
    assert r.stages() == expected and r.to_dict()["stages"] == expected
    assert sum(s["saved"] for s in expected.values()) == r.saved == 3_170_304

    text = str(r).splitlines()
    assert text[0] == "ResNet: 11,689,512 -> 8,519,208 parameters (-27.1%)"
    assert text[1].split() == ["stage", "groups", "members", "params", "before", "params", "after", "saved", "(of",
                               "model)"]  # fmt: skip
    assert text[3].split() == ["layer1", "2", "4", "147,456", "73,728", "73,728", "(-0.6%)"]
    assert text[6].split() == ["layer4", "1", "2", "4,718,592", "2,359,296", "2,359,296", "(-20.2%)"]
    groups = text[text.index("") + 1 :]  # the group table follows, as before
    assert groups[0].split()[:3] == ["group", "members", "weight"]
    assert [line.split()[0] for line in groups[2:7]] == [
        "layer1.conv1", "layer1.conv2", "layer2.conv2", "layer3.conv2", "layer4.conv2"
    ]  # fmt: skip
    assert groups[8].split()[:6] == ["total", "(model)", "11,689,512", "8,519,208", "3,170,304", "(-27.1%)"]

    markdown = r.to_markdown()
    assert markdown.startswith(
        "| stage | groups | members | params before | params after | saved (of model) |\n|---|---|---|---|---|---|\n"
        "| layer1 | 2 | 4 | 147,456 | 73,728 | 73,728 (-0.6%) |\n"
    )
    assert "| layer1.conv1 | 2 | 64x64x3x3 | 73,728 | 36,864 | 36,864 | " in markdown
    assert "| total (model) |  |  | 11,689,512 | 8,519,208 | 3,170,304 (-27.1%) |  |" in markdown


def test_dissimilarity_is_the_mean_relative_distance_to_the_average() -> None:
    model = cifar_resnet(20)
    r = sharify.report(model, sharify.sharify(model, example_inputs=X32, init="average"))
    assert [g.key for g in r.groups] == ["layer1.conv2", "layer2.conv2", "layer3.conv2"]
    for g in r.groups:
        weights = [model.get_submodule(p).weight.detach() for p in g.members]
        shared = torch.stack(weights).mean(0)
        by_hand = sum(((w - shared).norm() / w.norm()).item() for w in weights) / len(weights)
        assert g.dissimilarity == pytest.approx(by_hand, rel=1e-5)
        # independent random members: about sqrt((n - 1) / n) away from their average (the docstring's claim)
        assert g.dissimilarity == pytest.approx(((len(weights) - 1) / len(weights)) ** 0.5, abs=0.05)


def test_dissimilarity_is_zero_for_identical_members() -> None:
    model = cifar_resnet(20)
    with torch.no_grad():
        for stage in (model.layer1, model.layer2, model.layer3):
            for block in stage[1:]:
                block.conv2.weight.copy_(stage[0].conv2.weight)
    r = sharify.report(model, sharify.sharify(model, example_inputs=X32))
    assert [g.dissimilarity for g in r.groups] == [0.0, 0.0, 0.0]


def test_report_of_a_model_against_itself_is_refused() -> None:
    model = cifar_resnet(20)
    original = copy.deepcopy(model)
    shared = sharify.sharify(model, example_inputs=X32, inplace=True)
    with pytest.raises(ValueError, match=r"same CifarResNet twice.*inplace=True.*copy\.deepcopy.*inplace=False"):
        sharify.report(model, shared)
    other = sharify.sharify(copy.deepcopy(original), example_inputs=X32)
    with pytest.raises(ValueError, match=r"original CifarResNet is already sharified.*inplace=False"):
        sharify.report(shared, other)
    assert sharify.report(original, shared).saved > 0  # keeping a copy is the way
