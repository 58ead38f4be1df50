"""The performance benchmark's machinery on tiny models: it runs end to end and its memory ratios are exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import perf


def test_memory_ratios_follow_the_parameter_fraction() -> None:
    mem = perf.memory("wrn-16-2")
    assert 0.3 < mem["param_fraction"] < 1.0
    # parameters and optimizer state are exact byte counts: shared tensors are counted once
    assert mem["param_bytes_ratio"] == pytest.approx(mem["param_fraction"], rel=1e-9)
    assert mem["sgd_state_bytes_ratio"] == pytest.approx(mem["param_fraction"], rel=1e-9)
    # AdamW keeps a scalar step per parameter (excluded) and two moments per element
    assert mem["adamw_state_bytes_ratio"] == pytest.approx(mem["param_fraction"], rel=1e-9)
    # the file adds a header with one entry per tensor name
    assert mem["checkpoint_bytes_ratio"] == pytest.approx(mem["param_fraction"], rel=0.02)


def test_perf_main_end_to_end(tmp_path: Path) -> None:
    argv = ["--models", "wrn-16-1", "--time-models", "resnet18", "--big-model", "resnet26", "--small-meta-model",
            "resnet18", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    assert perf.main(argv) == 0
    results = json.loads((tmp_path / "perf.json").read_text())
    assert {r["mode"] for r in results["speed"]} == {"train step", "inference"}
    assert all(r["ratio"] > 0 for r in results["speed"])
    assert all(r["ratio_q1"] <= r["ratio_q3"] for r in results["speed"])
    assert all(r["verdict"] == perf.verdict(r["ratio"], tuple(r["ratio_ci95"])) for r in results["speed"])
    overhead = results["overhead"][0]
    assert overhead["model"] == "wrn-16-1" and overhead["members"] == 3 * 2  # conv2 of both blocks of 3 stages
    mem = results["memory"][0]
    peak = mem["peak"]
    assert peak["original_peak_bytes"] > 0 and peak["shared_peak_bytes"] > 0
    # the models materialised from the meta device for the peak are the ones measured exactly
    assert (peak["original_param_bytes"], peak["shared_param_bytes"]) == (
        mem["original_param_bytes"],
        mem["shared_param_bytes"],
    )
    assert peak["predicted_saving_bytes"] == 3 * (mem["original_param_bytes"] - mem["shared_param_bytes"]) > 0
    assert [r["model"] for r in results["analysis_memory"]] == ["resnet18", "resnet26"]
    text = (tmp_path / "perf.md").read_text()
    assert "| wrn-16-1 | train step |" in text and "## Analysis memory" in text and "ratio IQR" in text
    assert "### Peak memory of a training step" in text and "| wrn-16-1 | " in text.split("### Peak memory")[1]


def test_interleaved_alternates_the_order_every_round() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = perf.interleaved(fns, torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B / B A / A B
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_median_confidence_interval_and_verdict() -> None:
    # n = 15: the 95 % interval of the median spans the 4th to the 12th smallest value (binomial tables)
    assert perf.median_ci([float(i) for i in range(15)]) == (3.0, 11.0)
    assert perf.median_ci([float(i) for i in range(5)]) == (0.0, 4.0)  # too few values: the whole range
    assert perf.verdict(0.99, (0.95, 1.02)) == "met"
    assert perf.verdict(0.97, (0.95, 1.01)) == "noise"
    assert perf.verdict(0.95, (0.93, 0.97)) == "below"
