"""The deployment benchmark (issue 17): its --quick run end to end, and its committed results (marker ``results``),
whose ratios and verdicts are recomputed here from the rows' own numbers, not by the benchmark's functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from benchmarks import deploy  # (needs onnxruntime)
from tests.conftest import ROOT

BYTES_TOLERANCE = 0.02  # the targets: each shared file within 2 % of the parameter fraction ...
LATENCY_TARGET = 1.05  # ... and ONNX Runtime latency shared / original <= 1.05
FORMATS = ["safetensors", "onnx", "pt2", "safetensors-int8", "onnx-int8"]  # int8: shared int8 / original int8


def problems(results: dict[str, Any], markdown: str) -> list[str]:
    """What contradicts the numbers: a ratio or verdict other than the one its row's numbers give, a file whose check
    found copies, outputs outside the check's tolerance, or a target line of the markdown that miscounts."""
    out = []
    files = []
    for r in results["models"]:
        fraction = r["params_after"] / r["params_before"]
        if abs(r["param_fraction"] - fraction) > 1e-12:
            out.append(f"{r['model']}: param_fraction {r['param_fraction']} is not {fraction}")
        if r["onnx_check"]["max_copies"] != 1 or r["onnx_check"]["params"] != r["params_after"]:
            out.append(f"{r['model']}: the ONNX check found {r['onnx_check']}")
        if not r["max_abs_diff"] <= 1e-5 + 1e-4 * r["max_abs_output"]:
            out.append(f"{r['model']}: ONNX Runtime differs from PyTorch by {r['max_abs_diff']}")
        q = r.get("onnx_int8_check")
        if q is not None and (q["max_copies"] != 1 or q["int8_elements"] != q["int8_weights"]):
            out.append(f"{r['model']}: the int8 ONNX check found {q}")
        if q is not None and not r["int8_max_abs_diff"] <= 1e-5 + 1e-4 * r["int8_max_abs_output"]:
            out.append(f"{r['model']}: the int8 file in ONNX Runtime differs from PyTorch by {r['int8_max_abs_diff']}")
        for fmt, f in r["files"].items():
            ratio = f["shared_bytes"] / f["original_bytes"]
            expected = "met" if abs(ratio / fraction - 1) <= BYTES_TOLERANCE else "missed"
            if abs(f["ratio"] - ratio) > 1e-12 or f["verdict"] != expected:
                out.append(f"{r['model']} {fmt}: ratio {f['ratio']}, verdict {f['verdict']}: numbers say {expected!r}")
            files.append(expected)
    for r in results["latency"]:
        low, high = r["ratio_ci95"]
        expected = "met" if r["ratio"] <= LATENCY_TARGET else "noise" if low <= LATENCY_TARGET else "above"
        if r["verdict"] != expected or not low <= r["ratio"] <= high:
            out.append(f"{r['model']} {r['variant']} batch {r['batch']}: verdict {r['verdict']!r}, numbers say "
                       f"{expected!r} (ratio {r['ratio']}, CI {low}-{high})")  # fmt: skip
    text = " ".join(markdown.split())
    line = f"{files.count('met')} of {len(files)} shared files met."
    if line not in text:
        out.append(f"no line {line!r} in the markdown")
    rows = [r for r in results["latency"] if r["variant"] == "shared"]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("met", "noise", "above")}
    line = (f"{counts['met']} of {len(rows)} rows met; {counts['noise']} above it by less than this machine's noise; "
            f"{counts['above']} measurably above.")  # fmt: skip
    if line not in text:
        out.append(f"no line {line!r} in the markdown")
    if f"Command: `{results['command']}`" not in markdown:
        out.append("the markdown does not give the command")
    return out


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    assert deploy.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "deploy.json").read_text())
    assert results["command"] == f"python -m benchmarks.deploy --quick --out {tmp_path}"
    (row,) = results["models"]
    assert row["model"] == "wrn-16-1" and list(row["files"]) == FORMATS
    assert row["onnx_check"]["shared_tensors"] == 3  # conv2 of the 3 stages
    assert all(0 < f["ratio"] < 1 for f in row["files"].values())
    # int8 against the original's int8 file, the folded-BN variant against the float original
    assert [(r["variant"], r["baseline"], r["batch"]) for r in results["latency"]] == [
        ("shared", "original", 1),
        ("int8", "original-int8", 1),
        ("folded-bn", "original", 1),
    ]
    q = row["onnx_int8_check"]
    assert q["shared_tensors"] == 3 and q["max_copies"] == 1 and q["int8_elements"] == q["int8_weights"] > 0
    assert (
        q["dequantize_linear"] > 0
        and row["files"]["onnx-int8"]["shared_bytes"] < row["files"]["onnx"]["shared_bytes"] / 2
    )
    assert problems(results, (tmp_path / "deploy.md").read_text()) == []


def test_latency_verdict() -> None:
    assert deploy.latency_verdict(1.04, (0.98, 1.10)) == "met"
    assert deploy.latency_verdict(1.06, (1.01, 1.12)) == "noise"
    assert deploy.latency_verdict(1.08, (1.06, 1.12)) == "above"


def test_checks_fail_on_a_hand_edited_result(tmp_path: Path) -> None:
    onnx = {"original_bytes": 1000, "shared_bytes": 760, "ratio": 0.76, "verdict": "met"}
    row = {"model": "m", "params_before": 100, "params_after": 75, "param_fraction": 0.75,
           "onnx_check": {"max_copies": 1, "params": 75}, "max_abs_diff": 0.0, "max_abs_output": 1.0,
           "files": {"onnx": onnx}}  # fmt: skip
    lat = {"model": "m", "variant": "shared", "batch": 1, "ratio": 1.0, "ratio_ci95": [0.9, 1.1], "verdict": "met"}
    results = {"command": "python -m benchmarks.deploy", "models": [row], "latency": [lat]}
    text = ("Command: `python -m benchmarks.deploy` 1 of 1 shared files met. 1 of 1 rows met; 0 above it by less than "
            "this machine's noise; 0 measurably above.")  # fmt: skip
    assert problems(results, text) == []
    onnx.update(shared_bytes=800, ratio=0.8)  # 0.80 is 6.7 % off 0.75
    assert any("numbers say 'missed'" in p for p in problems(results, text))
    onnx.update(shared_bytes=760, ratio=0.76)
    lat["ratio"] = 1.07
    assert any("numbers say 'noise'" in p for p in problems(results, text))


@pytest.mark.results
def test_committed_results_follow_their_numbers() -> None:
    path = ROOT / "benchmarks" / "results" / "deploy.json"
    results = json.loads(path.read_text())
    assert [r["model"] for r in results["models"]] == deploy.MODELS
    assert all(list(r["files"]) == FORMATS for r in results["models"])
    assert {(r["model"], r["batch"]) for r in results["latency"] if r["variant"] == "shared"} == {
        (m, b) for m in deploy.MODELS for b in (1, 8)
    }
    assert problems(results, (path.parent / "deploy.md").read_text()) == []
