"""The ShaResNet rows (default sharing rule) reproduced from the architecture alone.

ImageNet rows use torchvision's models, CIFAR rows the user-style networks in benchmarks/cifar_models.py.
Models are built on the meta device: the analysis needs no weights. The committed table and the README's
table are checked against these counts under the ``results`` marker.
"""

from __future__ import annotations

import ast
import functools
import platform
import re
from pathlib import Path

import pytest
import torch
import torchvision

import sharify
from benchmarks import paper_tables
from benchmarks.cifar_models import preact_resnet164, wide_resnet
from benchmarks.paper_tables import ROWS, measure, measure_sharified, table
from tests.conftest import ROOT

COMMITTED_TABLE = ROOT / "benchmarks" / "results" / "paper_tables.md"
README = ROOT / "README.md"
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
        assert before / 1e6 == pytest.approx(row.published_before, abs=row.before_tolerance)


@pytest.mark.parametrize("index", range(len(ROWS)), ids=IDS)
def test_sharified_model_has_the_plans_parameter_count(index: int) -> None:
    """Not only the arithmetic: sharify() builds the row (meta device) with exactly the planned parameters."""
    assert _sharified(index) == _measured(index)[1]


@pytest.mark.results
def test_committed_table_is_a_fresh_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """benchmarks/results/paper_tables.md is what `python -m benchmarks.paper_tables --out FILE` writes.

    ``main`` runs as the command does (arguments, header, printing, writing, exit status); only the row
    counts come from this session's cache of the same ``measure``/``measure_sharified`` calls. The version
    line is the one line allowed to differ (it names this machine's torch).
    """
    index = {id(row): i for i, row in enumerate(ROWS)}
    monkeypatch.setattr(paper_tables, "measure", lambda row: _measured(index[id(row)]))
    monkeypatch.setattr(paper_tables, "measure_sharified", lambda row: _sharified(index[id(row)]))
    out = tmp_path / "results" / "paper_tables.md"
    assert paper_tables.main(["--out", str(out)]) == 0
    written = out.read_text()
    assert capsys.readouterr().out == written + "\n"
    fresh, committed = written.splitlines(), COMMITTED_TABLE.read_text().splitlines()
    version = f"torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}."
    assert fresh[3] == version and re.fullmatch(r"torch \S+, torchvision \S+, Python \S+\.", committed[3])
    assert fresh[:3] + fresh[4:] == committed[:3] + committed[4:]
    assert committed[:3] == [
        "# Published parameter counts, reproduced by sharify",
        "",
        "Command: `python -m benchmarks.paper_tables` (architecture only: meta-device models, no weights).",
    ]
    assert committed[-1] == f"{len(ROWS)} of {len(ROWS)} rows within tolerance."


def _readme_table() -> list[list[str]]:
    """Cells of the README's "Published parameter counts, reproduced" table, one list per row."""
    section = README.read_text().split("\n## Published parameter counts, reproduced\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[:2] == ["| paper | model | options | published | sharify |", "|---|---|---|---|---|"]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _readme_options(cell: str) -> dict[str, object]:
    """``defaults`` or a backquoted keyword list (``preset="dsfb-basis", shared_rank=48``) as a dict."""
    if cell == "defaults":
        return {}
    call = ast.parse(f"f({cell.removeprefix('`').removesuffix('`')})", mode="eval").body
    assert isinstance(call, ast.Call) and not call.args
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}


@pytest.mark.results
def test_readme_table_is_what_the_benchmark_measures() -> None:
    """Each README row: the benchmark's row (same order), options, published value and measured counts."""
    cells = _readme_table()
    assert len(cells) == len(ROWS)
    for i, (row, (paper, model, options, published, measured)) in enumerate(zip(ROWS, cells, strict=True)):
        before, after = _measured(i)
        assert paper == row.paper
        assert model == (row.model if row.dataset == "ImageNet" else f"{row.dataset} {row.model}")
        # "sharesnet" is the default preset, which the README writes as "defaults"
        assert _readme_options(options) == {k: v for k, v in row.options.items() if (k, v) != ("preset", "sharesnet")}
        if row.published_before is None:  # DSFB: exact counts
            value, _, note = published.partition(" (")
            assert value == f"{round(row.published_after * 1e6):,}" and measured == f"{after:,}"
            assert note == ("torchvision's)" if row.model.startswith("MobileNetV2") else "")
        else:  # ShaResNet: millions at the paper's rounding (0.1 M on ImageNet, 0.01 M on CIFAR)
            digits = 2 if row.tolerance <= 0.01 else 1
            assert published == f"{row.published_before:.{digits}f} → {row.published_after:.{digits}f} M"
            exact = "" if row.dataset == "ImageNet" else f" ({after:,})"
            assert measured == f"{before / 1e6:.2f} → {after / 1e6:.2f} M{exact}"


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
    before = sum(p.numel() for p in model.parameters())
    saved = _hand_arithmetic_torchvision(model)
    p = sharify.plan(model)
    assert p.params_saved == saved and p.params_before == before
    assert [g.key for g in p.groups] == ["layer1.conv2", "layer2.conv2", "layer3.conv2", "layer4.conv2"]
    for g in p.groups:
        assert all(m.endswith(".conv2") and m.startswith(g.stage + ".") for m in g.members)
    # not only the arithmetic: the model sharify() builds (meta device) has exactly these parameters
    shared = sharify.sharify(model)
    assert sum(q.numel() for q in shared.parameters()) == p.params_after == before - saved
    assert sorted(sharify.shared_groups(shared)) == [g.key for g in p.groups]
    assert sum(q.numel() for q in model.parameters()) == before  # inplace=False: the original keeps its convs


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
