"""The ShaResNet rows (default sharing rule) reproduced from the architecture alone.

ImageNet rows use torchvision's models, CIFAR rows the user-style networks in benchmarks/cifar_models.py.
Models are built on the meta device: the analysis needs no weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torchvision

import sharify
from benchmarks.cifar_models import preact_resnet164, wide_resnet
from benchmarks.paper_tables import ROWS, measure, measure_sharified, table

COMMITTED_TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "paper_tables.md"
IDS = [f"{r.paper}-{r.model}" for r in ROWS]


def _meta(builder, *args, **kwargs):
    with torch.device("meta"):
        return builder(*args, **kwargs)


@functools.cache
def _measured(index: int) -> tuple[int, int]:
    """Each row's plan counts, computed once per session (the table test below reuses them)."""
    return measure(ROWS[index])


@functools.cache
def _sharified(index: int) -> int:
    return measure_sharified(ROWS[index])


@pytest.mark.parametrize("index", range(len(ROWS)), ids=IDS)
def test_published_row(index: int) -> None:
    row = ROWS[index]
    before, after = _measured(index)
    assert abs(after / 1e6 - row.published_after) <= row.tolerance + 1e-9
    if row.published_before is not None:
        assert before / 1e6 == pytest.approx(row.published_before, abs=0.05)


@pytest.mark.parametrize("index", range(len(ROWS)), ids=IDS)
def test_sharified_model_has_the_plans_parameter_count(index: int) -> None:
    """Not only the arithmetic: sharify() builds the row (meta device) with exactly the planned parameters."""
    assert _sharified(index) == _measured(index)[1]


def test_committed_table_is_a_fresh_run() -> None:
    """benchmarks/results/paper_tables.md equals `python -m benchmarks.paper_tables` output (version line aside)."""
    fresh, failures = table([(row, *_measured(i), _sharified(i)) for i, row in enumerate(ROWS)])
    committed = COMMITTED_TABLE.read_text().splitlines()
    start = committed.index(fresh[0])
    assert committed[start:] == fresh and failures == 0
    version = [line for line in committed[:start] if line.startswith("torch ")]
    assert len(version) == 1 and committed[:start] == [
        "# Published parameter counts, reproduced by sharify",
        "",
        "Command: `python -m benchmarks.paper_tables` (architecture only: meta-device models, no weights).",
        version[0],
        "",
    ]


def test_table_flags_a_sharified_count_that_differs_from_the_plan() -> None:
    row = ROWS[0]
    before, after = _measured(0)
    lines, failures = table([(row, before, after, after + 1)])
    assert failures == 1 and "NO: the sharified model has" in lines[2]


@pytest.mark.parametrize(
    ("name", "before", "after"),
    [("resnet34", 21.80, 13.6), ("resnet50", 25.56, 20.5), ("resnet101", 44.55, 29.4), ("resnet152", 60.19, 36.8)],
)
def test_sharesnet_imagenet_rows(name: str, before: float, after: float) -> None:
    p = sharify.plan(_meta(torchvision.models.get_model, name))
    assert p.params_before / 1e6 == pytest.approx(before, abs=0.05)
    assert p.params_after / 1e6 == pytest.approx(after, abs=0.05)


def _hand_arithmetic_torchvision(model: torchvision.models.ResNet) -> int:
    """Saved parameters by hand: per stage, the stride-1 3x3 convs (conv2) share one tensor."""
    saved = 0
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        convs = [b.conv2 for b in layer if b.conv2.stride == (1, 1)]
        saved += (len(convs) - 1) * convs[0].weight.numel() if len(convs) > 1 else 0
    return saved


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_resnets_match_hand_arithmetic(name: str) -> None:
    model = _meta(torchvision.models.get_model, name)
    p = sharify.plan(model)
    assert p.params_saved == _hand_arithmetic_torchvision(model)
    assert [g.key for g in p.groups] == ["layer1.conv2", "layer2.conv2", "layer3.conv2", "layer4.conv2"]
    for g in p.groups:
        assert all(m.endswith(".conv2") and m.startswith(g.stage + ".") for m in g.members)


def test_preact_resnet164_cifar_row() -> None:
    p = sharify.plan(_meta(preact_resnet164), example_inputs=torch.empty(1, 3, 32, 32))
    assert p.params_before / 1e6 == pytest.approx(1.70, abs=0.01)
    assert p.params_after / 1e6 == pytest.approx(0.93, abs=0.01)
    # stage 1: all 18 bottleneck 3x3 convs (16->16, stride 1); stages 2 and 3: the 17 unstrided ones.
    assert [len(g.members) for g in p.groups] == [18, 17, 17]


def test_wrn_40_4_cifar_row_skips_first_blocks() -> None:
    model = _meta(wide_resnet, 40, 4)
    p = sharify.plan(model, example_inputs=torch.empty(1, 3, 32, 32), skip_first_block=True)
    assert p.params_before / 1e6 == pytest.approx(8.95, abs=0.01)
    assert p.params_after / 1e6 == pytest.approx(5.85, abs=0.01)
    # the second conv of blocks 1..5 of each stage
    assert p.groups[0].members == tuple(f"blocks.0.{i}.conv2" for i in range(1, 6))


def test_wrn_28_10_cifar100_row() -> None:
    p = sharify.plan(_meta(wide_resnet, 28, 10, 100), example_inputs=torch.empty(1, 3, 32, 32), skip_first_block=True)
    assert p.params_before / 1e6 == pytest.approx(36.54, abs=0.01)
    assert p.params_after / 1e6 == pytest.approx(26.86, abs=0.01)


def test_report_of_real_model_matches_plan() -> None:
    model = torchvision.models.resnet34()
    shared = sharify.sharify(model)
    r = sharify.report(model, shared)
    assert r.params_after == sum(p.numel() for p in shared.parameters()) == 13_613_864
    assert r.params_before == 21_797_672
