"""The performance benchmark's machinery on tiny models: it runs end to end and its memory ratios are exact.

The verdicts of the speed rows are checked against the rows' own numbers by a small computation of this file's,
not by the benchmark's ``perf.verdict``: on the fresh run here, and on the committed results (marker ``results``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import perf
from tests.conftest import ROOT

TARGET = 0.98  # the README's speed target: the shared model at >= 98 % of the original's throughput
DELTA_TARGET = 0.97  # issue 16: relaxed sharing (delta_rank, param_budget) at >= 97 % of the original's


def verdict_problems(rows: list[dict[str, Any]], target: float = TARGET) -> list[str]:
    """What contradicts the numbers in a speed row: a verdict other than the one its median ratio and 95 %
    interval give ("met": ratio >= target; "noise": below, but the interval reaches it; "below": the whole
    interval under it), or a median outside its own interquartile range or interval."""
    problems = []
    for r in rows:
        where = f"{r['model']} {r['mode']} (channels_last={r['channels_last']}, compile={r['compile']})"
        where += f" {r['sharing']} {r['implementation']}" if "implementation" in r else ""
        ratio, (low, high) = r["ratio"], r["ratio_ci95"]
        if not (r["ratio_q1"] <= ratio <= r["ratio_q3"] and low <= ratio <= high):
            problems.append(f"{where}: ratio {ratio} outside IQR {r['ratio_q1']}-{r['ratio_q3']} or CI {low}-{high}")
        if ratio >= target:
            expected = "met"
        elif high >= target:
            expected = "noise"
        else:
            expected = "below"
        if r["verdict"] != expected:
            problems.append(f"{where}: verdict {r['verdict']!r}, the numbers say {expected!r}")
    return problems


def summary_problems(rows: list[dict[str, Any]], markdown: str) -> list[str]:
    """The markdown's target line disagrees with the rows' verdicts (counts of met / noise / below)."""
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("met", "noise", "below")}
    line = (
        f"Target (ratio >= {TARGET}): {counts['met']} of {len(rows)} rows met; {counts['noise']} below it by less "
        f"than this machine's noise"
    )
    return [] if line in " ".join(markdown.split()) else [f"no line {line!r} in the markdown"]


def delta_summary_problems(rows: list[dict[str, Any]], markdown: str) -> list[str]:
    """The markdown's relaxed-sharing target lines (one per implementation) disagree with the rows' verdicts."""
    problems = []
    for impl in ("materialised", "activations", "cached"):
        own = [r for r in rows if r["implementation"] == impl]
        if impl == "cached" and not own:  # only eager inference has cached rows; older runs have none
            continue
        counts = {v: sum(r["verdict"] == v for r in own) for v in ("met", "noise", "below")}
        line = (
            f"Relaxed-sharing target, {impl} (ratio >= {DELTA_TARGET}): {counts['met']} of {len(own)} rows met; "
            f"{counts['noise']} below it by less than this machine's noise; {counts['below']} measurably below."
        )
        problems += [] if line in " ".join(markdown.split()) else [f"no line {line!r} in the markdown"]
    return problems


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
            "resnet18", "--delta-models", "wrn-16-1", "--delta-ranks", "2", "--delta-budgets", "--warmup", "0",
            "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    assert perf.main(argv) == 0
    results = json.loads((tmp_path / "perf.json").read_text())
    assert [(r["mode"], r["implementation"]) for r in results["delta"]] == [
        ("train step", "materialised"),
        ("train step", "activations"),
        ("inference", "materialised"),
        ("inference", "activations"),
        ("inference", "cached"),
    ]
    assert {r["mode"] for r in results["speed"]} == {"train step", "inference"}
    assert all(r["ratio"] > 0 for r in results["speed"])
    assert all(r["ratio_q1"] <= r["ratio_q3"] for r in results["speed"])
    assert verdict_problems(results["speed"]) == []
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
    assert summary_problems(results["speed"], text) == []
    assert "## Relaxed sharing" in text and delta_summary_problems(results["delta"], text) == []


def test_delta_only_run_measures_both_implementations(tmp_path: Path) -> None:
    argv = ["--delta-only", "--delta-models", "wrn-16-1", "--delta-ranks", "2", "--delta-budgets", "0.9",
            "--warmup", "0", "--repeats", "2", "--out", str(tmp_path)]  # fmt: skip
    assert perf.main(argv) == 0
    results = json.loads((tmp_path / "perf.json").read_text())
    assert results["speed"] == [] and results["memory"] == [] and results["sharify_time"] == []
    rows = results["delta"]
    keys = {(r["sharing"], r["mode"], r["implementation"]) for r in rows}
    modes = [("train step", "materialised"), ("train step", "activations"), ("inference", "materialised"),
             ("inference", "activations"), ("inference", "cached")]  # fmt: skip
    assert keys == {(s, m, i) for s in ("delta_rank=2", "param_budget=0.9") for m, i in modes}
    assert len(rows) == len(keys)
    assert verdict_problems(rows, DELTA_TARGET) == []
    for r in rows:
        # both implementations compute the same function, and each row times the original of its own rounds
        assert r["max_rel_difference"] < 1e-5 and r["members_with_delta"] > 0 and r["shared_img_s"] > 0
        assert ("vs_materialised" in r) == (r["implementation"] == "activations")
        if r["implementation"] == "cached":  # each member's sum computed once, before the timed calls
            assert r["shared_flops"] == r["original_flops"] > 0
        else:  # the delta costs FLOPs in either implementation
            assert r["shared_flops"] > r["original_flops"] > 0
    budget = next(r for r in rows if r["sharing"] == "param_budget=0.9")
    rank = next(r for r in rows if r["sharing"] == "delta_rank=2")
    assert rank["param_fraction"] < budget["param_fraction"] <= 0.9
    text = (tmp_path / "perf.md").read_text()
    assert "## Throughput" not in text and "## Memory" not in text and "## sharify() wall time" not in text
    assert "| wrn-16-1 | param_budget=0.9 |" in text and "| FLOPs |" in text
    assert delta_summary_problems(rows, text) == []


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


# --- the checks above can fail: hand-edited copies of a speed table ------------------------------------------

ROWS = [  # one row of each verdict, as perf.json writes them
    {"model": "m", "mode": "train step", "channels_last": False, "compile": False, "ratio": 0.99,
     "ratio_q1": 0.97, "ratio_q3": 1.01, "ratio_ci95": [0.96, 1.02], "verdict": "met"},
    {"model": "m", "mode": "inference", "channels_last": False, "compile": False, "ratio": 0.97,
     "ratio_q1": 0.96, "ratio_q3": 0.985, "ratio_ci95": [0.95, 0.99], "verdict": "noise"},
    {"model": "m", "mode": "inference", "channels_last": True, "compile": False, "ratio": 0.95,
     "ratio_q1": 0.94, "ratio_q3": 0.96, "ratio_ci95": [0.93, 0.97], "verdict": "below"},
]  # fmt: skip
SUMMARY = (
    "Target (ratio >= 0.98): 1 of 3 rows met; 1 below it by less than this machine's noise (the 95% confidence "
    "interval of the median reaches 0.98); 1 measurably below."
)


def _edited(path: Path, index: int, **fields: Any) -> list[dict[str, Any]]:
    """A copy of ``ROWS`` with row ``index`` edited, written to ``path`` as perf.json and read back."""
    rows = copy.deepcopy(ROWS)
    rows[index].update(fields)
    path.write_text(json.dumps({"speed": rows}))
    return json.loads(path.read_text())["speed"]


def test_speed_checks_pass_on_consistent_rows() -> None:
    assert verdict_problems(ROWS) == [] and summary_problems(ROWS, SUMMARY) == []


@pytest.mark.parametrize(
    ("index", "fields", "message"),
    [
        (0, {"verdict": "noise"}, "verdict 'noise', the numbers say 'met'"),  # a median at the target is met
        (1, {"verdict": "met"}, "verdict 'met', the numbers say 'noise'"),  # met with a median under the target
        (1, {"ratio_ci95": [0.95, 0.975]}, "verdict 'noise', the numbers say 'below'"),  # interval under the target
        (2, {"verdict": "noise"}, "verdict 'noise', the numbers say 'below'"),
        (2, {"ratio": 0.985, "ratio_q3": 0.99, "ratio_ci95": [0.93, 0.99]}, "the numbers say 'met'"),
        (0, {"ratio_ci95": [1.0, 1.02]}, "outside IQR 0.97-1.01 or CI 1.0-1.02"),  # median outside its interval
        (1, {"ratio_q1": 0.975}, "outside IQR 0.975-0.985"),
    ],
)
def test_verdict_check_fails_on_a_hand_edited_table(
    tmp_path: Path, index: int, fields: dict[str, Any], message: str
) -> None:
    problems = verdict_problems(_edited(tmp_path / "perf.json", index, **fields))
    assert len(problems) == 1 and message in problems[0], problems


def test_summary_check_fails_when_the_counts_disagree(tmp_path: Path) -> None:
    rows = _edited(tmp_path / "perf.json", 2, verdict="noise", ratio_ci95=[0.93, 0.99])  # consistent, but 2 noise
    assert verdict_problems(rows) == []
    assert summary_problems(rows, SUMMARY) != []
    assert summary_problems(rows, SUMMARY.replace("1 below it", "2 below it")) == []


@pytest.mark.results
def test_committed_delta_verdicts_follow_their_numbers() -> None:
    path = ROOT / "benchmarks" / "results" / "perf_delta" / "perf.json"
    rows = json.loads(path.read_text())["delta"]
    assert rows and all(r["max_rel_difference"] < 1e-4 for r in rows)
    assert verdict_problems(rows, DELTA_TARGET) == []
    assert delta_summary_problems(rows, (path.parent / "perf.md").read_text()) == []


@pytest.mark.results
@pytest.mark.parametrize("name", ["perf.json", "perf_recheck_wrn-28-10/perf.json"])
def test_committed_speed_verdicts_follow_their_numbers(name: str) -> None:
    path = ROOT / "benchmarks" / "results" / name
    results = json.loads(path.read_text())
    assert verdict_problems(results["speed"]) == []
    assert summary_problems(results["speed"], (path.parent / "perf.md").read_text()) == []


@pytest.mark.results
def test_readme_relaxed_sharing_speed_is_the_committed_run() -> None:
    """The ratios 'Choosing how much to share' quotes are rows of results/perf_delta, and so is its summary."""
    table = (ROOT / "benchmarks" / "results" / "perf_delta" / "perf.md").read_text()
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| resnet50 |")]
    ratio = {(r[2].strip(), r[4].strip(), r[9].strip()): r[12].strip() for r in rows}
    readme = (ROOT / "README.md").read_text()
    quoted = " ".join(readme.split("Throughput: the deltas are added")[1].split("## Performance")[0].split())
    specs = ("delta_rank=8", "delta_rank=32", "param_budget=0.9")
    train = [ratio[s, "train step", "materialised"] for s in specs]
    assert (
        f"{train[0]} of the original's throughput at rank 8, {train[1]} at rank 32 and {train[2]} at `param_budget=0.9`"
        in quoted
    )
    cached = (
        ", ".join(ratio[s, "inference", "cached"] for s in specs[:2]) + f" and {ratio[specs[2], 'inference', 'cached']}"
    )
    plain = ", ".join(ratio[s, "inference", "materialised"] for s in specs)
    assert f"inference runs at {cached} of the original" in quoted and f"without it {plain}" in quoted
    summary = {impl: next(line for line in table.splitlines() if line.startswith(f"Relaxed-sharing target, {impl}"))
               for impl in ("materialised", "cached")}  # fmt: skip
    assert (
        "0 of 6 rows met; 2 below it by less than this machine's noise; 4 measurably below" in summary["materialised"]
    )
    assert "(materialised: 0 of 6 rows met, 2 below it within this machine's noise, 4 measurably below)" in quoted
    assert "3 of 3 rows met" in summary["cached"] and "(target met in 3 of 3 rows;" in quoted
    assert "--repeats 40" in table and "--repeats 40" in quoted
