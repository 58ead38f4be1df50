"""The accuracy-per-parameter front (``benchmarks.pareto``): its smoke run does every step on tiny fake data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import pareto
from benchmarks.pareto_report import targets
from tests.conftest import ROOT
from tests.fake_data import fake_fashion_mnist


def test_pareto_smoke(tmp_path: Path) -> None:
    data = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "out"
    assert pareto.main(["--smoke", "--data-root", str(data), "--out", str(out)]) == 0
    payload = json.loads((out / "pareto.json").read_text())
    rows = {r["name"]: r for r in payload["rows"]}
    methods = {r["method"] for r in payload["rows"]}
    assert methods == {"baseline", "control", "sharify", "torch-pruning", "scratch"}
    base = rows["ResNet-14 baseline"]
    full = rows["full, all_spatial"]
    assert full["params"] < base["params"] and full["options"]["positions"] == ["all_spatial"]
    # relaxed sharing sits between full sharing and the baseline, a budget within its fraction
    delta = rows["delta_rank=2, all_spatial"]
    assert full["params"] < delta["params"] < base["params"]
    budget = rows["param_budget=0.8, all_spatial"]
    assert full["params"] <= budget["params"] <= 0.8 * base["params"]
    assert rows["param_budget=0.6, all_spatial"]["note"].startswith("not run: param_budget=0.6")
    for r in payload["rows"]:
        if r["method"] == "sharify" and r["params"]:
            assert all(r[k] is not None for k in ("before", "recalibrated", "finetuned", "distilled")), r
    pruned = rows["L1 pruning at param_budget=0.8, all_spatial"]
    assert abs(pruned["params"] - budget["params"]) < 0.15 * budget["params"]  # the bisection's granularity
    assert any(
        r["method"] == "scratch" and r["name"].endswith("(at param_budget=0.8, all_spatial)") for r in rows.values()
    )
    table = (out / "pareto.md").read_text()
    assert "| full, all_spatial | sharify |" in table and "Targets:" in table
    assert (out / "pareto.png").stat().st_size > 10_000
    assert payload["git_commit"] and payload["command"].startswith("python -m benchmarks.pareto --smoke")
    assert "Command: `python -m benchmarks.pareto --smoke" in table
    assert any(line.startswith("- after fine-tuning at param_budget=0.8") for line in targets(payload["rows"]))


@pytest.mark.results
def test_committed_front_and_the_readme_say_the_same(tmp_path: Path) -> None:
    """pareto.md is what the two committed runs' JSON give, and every row the README quotes is one of its rows."""
    results = ROOT / "benchmarks" / "results" / "pareto"
    runs = [str(results / depth / "pareto.json") for depth in ("resnet20", "resnet56")]
    assert pareto.main(["--from-json", *runs, "--out", str(tmp_path)]) == 0
    committed = (results / "pareto.md").read_text()
    assert (tmp_path / "pareto.md").read_text() == committed
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Choosing how much to share")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 22
    assert all(row in committed for row in rows)
    for figure in ("76.9 % after BatchNorm re-calibration against the baseline's 77.7 %", "61.5 % against 57.5 %"):
        assert figure.split(" ")[0] in committed
