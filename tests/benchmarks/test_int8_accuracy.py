"""int8 against float on the study's model (issue 17): the smoke run end to end on a tiny synthetic Fashion-MNIST, and
the committed results (marker ``results``), whose derived figures are recomputed here from the rows' own numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import int8_accuracy
from tests.conftest import ROOT
from tests.fake_data import fake_fashion_mnist

MODELS = ["original", "shared", "shared, folded BN"]


def problems(results: dict[str, Any], markdown: str) -> list[str]:
    """What contradicts the numbers: a difference other than int8 - float, a ratio outside its interval, a model
    missing, or a figure of the JSON that the markdown does not show."""
    out = []
    if [r["model"] for r in results["accuracy"]] != MODELS:
        out.append(f"accuracy rows {[r['model'] for r in results['accuracy']]}, expected {MODELS}")
    for r in results["accuracy"]:
        if abs(r["int8_minus_float"] - (r["int8_top1"] - r["float_top1"])) > 1e-9:
            out.append(f"{r['model']}: int8_minus_float {r['int8_minus_float']} is not int8 - float")
        if not 0 <= r["agreement"] <= 100 or not 0 <= r["int8_top1"] <= 100:
            out.append(f"{r['model']}: a percentage out of range: {r}")
        line = f"| {r['model']} | {r['params']:,} | {r['float_top1']:.2f} | {r['int8_top1']:.2f} |"
        if line not in markdown:
            out.append(f"no line starting {line!r} in the markdown")
    for r in results["speed"]:
        low, high = r["ratio_ci95"]
        if not low <= r["ratio"] <= high:
            out.append(f"{r['model']} batch {r['batch']}: ratio {r['ratio']} outside its interval {low}-{high}")
        if (
            f"| {r['model']} | {r['batch']} | {r['float_ms']:.2f} | {r['int8_ms']:.2f} | {r['ratio']:.3f} |"
            not in markdown
        ):
            out.append(f"{r['model']} batch {r['batch']}: the markdown does not show its speed row")
    if {(r["model"], r["batch"]) for r in results["speed"]} != {
        (m, b) for m in MODELS for b in results["settings"]["batches"]
    }:
        out.append("the speed rows are not one per model and batch size")
    if f"Command: `{results['command']}` (git commit `{results['git_commit']}`" not in markdown:
        out.append("the markdown does not give the command and commit")
    return out


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    data = fake_fashion_mnist(tmp_path / "data", n=128)
    out = tmp_path / "out"
    assert int8_accuracy.main(["--smoke", "--data-root", str(data), "--out", str(out), "--threads", "1"]) == 0
    results = json.loads((out / "int8_accuracy.json").read_text())
    assert (
        results["command"] == f"python -m benchmarks.int8_accuracy --smoke --data-root {data} --out {out} --threads 1"
    )
    assert len(results["git_commit"]) == 40 or results["git_commit"] == "unknown"
    assert problems(results, (out / "int8_accuracy.md").read_text()) == []
    rows = {r["model"]: r for r in results["accuracy"]}
    assert rows["shared"]["params"] < rows["original"]["params"]
    assert rows["shared"]["int8_safetensors_bytes"] < rows["original"]["int8_safetensors_bytes"]
    assert len(results["finetune_top1"]["shared"]) == 2  # before fine-tuning (after BN re-calibration), after 1 epoch


def test_problems_catch_a_hand_edited_result() -> None:
    row = {"model": "original", "params": 10, "float_top1": 90.0, "int8_top1": 89.5, "int8_minus_float": -0.5,
           "agreement": 99.0}  # fmt: skip
    results = {"command": "c", "git_commit": "g", "settings": {"batches": []}, "speed": [],
               "accuracy": [row, {**row, "model": "shared"}, {**row, "model": "shared, folded BN"}]}  # fmt: skip
    text = "Command: `c` (git commit `g`" + "".join(f"| {m} | 10 | 90.00 | 89.50 |" for m in MODELS)
    assert problems(results, text) == []
    row["int8_top1"] = 90.5
    assert any("is not int8 - float" in p for p in problems(results, text))


@pytest.mark.results
def test_committed_results_follow_their_numbers() -> None:
    path = ROOT / "benchmarks" / "results" / "int8_accuracy.json"
    results = json.loads(path.read_text())
    assert results["command"] == "python -m benchmarks.int8_accuracy"
    assert problems(results, (path.parent / "int8_accuracy.md").read_text()) == []
