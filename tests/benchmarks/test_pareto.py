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
    """pareto.md is what the committed run's JSON gives, that run is the default command, and every row the README
    quotes is one of its rows."""
    results = ROOT / "benchmarks" / "results" / "pareto"
    payload = json.loads((results / "pareto.json").read_text())
    assert payload["command"].strip() == "python -m benchmarks.pareto"  # the defaults, as `--help` documents them
    assert {r["depth"] for r in payload["rows"]} == {20, 56}
    assert pareto.main(["--from-json", str(results / "pareto.json"), "--out", str(tmp_path)]) == 0
    committed = (results / "pareto.md").read_text()
    assert (tmp_path / "pareto.md").read_text() == committed
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Choosing how much to share")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 24
    assert all(row in committed for row in rows)
    quoted = " ".join(section.split())
    for figure in ("86.15 % against 88.25 %", "84.55 % against 85.80 %", "80.70 % against 81.85 %",
                   "88.05 % at 14 %", "87.80 → 88.40 %", "88.45 % vs 88.50 %", "85.60 % vs 85.65 %"):  # fmt: skip
        assert figure in quoted
        numbers = [n for n in figure.replace("%", "").replace("→", " ").split() if n[0].isdigit() and "." in n]
        assert all(f"| {n} |" in committed for n in numbers), figure
    assert "met at 5 of 6 counts on ResNet-20" in quoted and "and 1 of 6 on ResNet-56" in quoted
    for depth, met in ((20, 5), (56, 1)):
        lines = committed.split(f"## ResNet-{depth}")[1].split("## ResNet-")[0].splitlines()
        after = [line for line in lines if line.startswith("- after fine-tuning")]
        assert (len(after), sum(line.endswith("-> met") for line in after)) == (6, met)
