"""The accuracy study: its smoke run (every step on a tiny synthetic Fashion-MNIST), and the committed
results — the markdown, the README's summary and study.json must say the same (marker ``results``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks import accuracy_study
from benchmarks.accuracy_study_report import Run, run_dir_name, run_lambda_r, study_args
from tests.conftest import ROOT
from tests.fake_data import fake_fashion_mnist

RESULTS = ROOT / "benchmarks" / "results" / "accuracy_study"
README = ROOT / "README.md"


def test_accuracy_study_smoke(tmp_path: Path) -> None:
    data = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "out"
    assert accuracy_study.main(["--smoke", "--data-root", str(data), "--out", str(out), "--bn-images", "32"]) == 0
    table = (out / "accuracy_study.md").read_text()
    names = ("random", "first", "average", "average + BN recal.", "scaled", "scaled + BN recal.", "basis S24U8 (svd)",
             "shared, from scratch", "plain ResNet-8, from scratch", "baseline + same fine-tune (control)",
             "aligned average", "aligned average + BN recal.", "aligned scaled", "aligned scaled + BN recal.",
             "aligned basis S24U8 (svd)")  # fmt: skip
    for name in names:
        assert f"| {name} |" in table
    assert "## Findings" in table and (out / "accuracy_study.png").stat().st_size > 10_000
    study = json.loads((out / "study.json").read_text())
    runs = {r["name"]: r for r in study["runs"]}
    assert [m["epoch"] for m in runs["scaled"]["metrics"]] == [0, 1]
    assert runs["scaled"]["params"] == runs["average"]["params"] < runs["baseline"]["params"]
    assert (out / "runs" / "scaled" / "metrics.jsonl").exists()
    # every variant records the report's member error right after sharifying; BN re-calibration does not change it
    assert all(r["dissimilarity"] >= 0 for r in runs.values() if r["kind"] == "variant")
    assert runs["scaled + BN recal."]["dissimilarity"] == runs["scaled"]["dissimilarity"]
    assert (
        runs["aligned average"]["options"]["align"] is True
        and runs["aligned average"]["params"] == runs["average"]["params"]
    )
    assert "Channel alignment, average:" in table
    control = runs["baseline + same fine-tune (control)"]
    assert control["params"] == runs["baseline"]["params"] and [m["epoch"] for m in control["metrics"]] == [0, 1]
    # epoch 0 of the control is the trained baseline itself, untouched
    assert control["metrics"][0]["top1"] == runs["baseline"]["metrics"][-1]["top1"]
    # what the run recorded for the future: the commit that ran, the data, each run's regulariser weight
    assert study["git_commit"] == _head() and f"Code: git commit `{study['git_commit']}`." in table
    assert study["data"] == {"source": str(data), "train_images": 96, "val_images": 96, "classes": 10}
    for run in study["runs"]:
        config = json.loads((out / "runs" / run_dir_name(run["name"]) / "config.json").read_text())
        assert run["lambda_r"] == config["lambda_r"] == (10.0 if run["options"].get("method") == "basis" else 0.0)
    assert "lambda_r = 10 in the training of basis S24U8 (svd), aligned basis S24U8 (svd); 0 in every other" in table


def _head() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


# --- the committed study: its markdown, the README's summary and study.json agree (marker `results`) ----------


def _committed() -> dict[str, Any]:
    return json.loads((RESULTS / "study.json").read_text())


@pytest.mark.results
def test_committed_markdown_is_rewritten_from_study_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--from-json` rewrites accuracy_study.md (and the plot) from study.json alone, without training; the
    committed markdown is exactly that text."""
    (tmp_path / "runs" / "baseline").mkdir(parents=True)
    shutil.copy(RESULTS / "study.json", tmp_path / "study.json")
    # the committed study predates the "data" record in study.json: the baseline's config.json has it
    shutil.copy(RESULTS / "runs" / "baseline" / "config.json", tmp_path / "runs" / "baseline" / "config.json")
    assert accuracy_study.main(["--from-json", str(tmp_path / "study.json")]) == 0
    text = (tmp_path / "accuracy_study.md").read_text()
    assert capsys.readouterr().out == text + "\n"
    assert text == (RESULTS / "accuracy_study.md").read_text()
    assert (tmp_path / "accuracy_study.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "study.json").read_text()) == _committed()  # read, not rewritten


@pytest.mark.results
def test_committed_runs_regulariser_is_what_the_markdown_says() -> None:
    """Filter-basis rows fine-tuned with lambda_r = 10 and every other run with 0, as each run's config.json
    records; the markdown says so."""
    study = _committed()
    args = study_args(study)
    recorded = {}
    for run in study["runs"]:
        config = json.loads((RESULTS / "runs" / run_dir_name(run["name"]) / "config.json").read_text())
        recorded[run["name"]] = config["lambda_r"]
        assert run_lambda_r(Run(**run), args) == config["lambda_r"]
    assert {name for name, lam in recorded.items() if lam} == {"basis S24U8 (svd)", "aligned basis S24U8 (svd)"}
    assert {lam for lam in recorded.values()} == {0.0, 10.0}
    line = (
        "Orthogonality regulariser (`sharify.orthogonality_loss`, the paper's lambda_R): lambda_r = 10 in the "
        "training of basis S24U8 (svd), aligned basis S24U8 (svd); 0 in every other run"
    )
    assert line in (RESULTS / "accuracy_study.md").read_text()


def _readme_section() -> str:
    section = README.read_text().split("\n## What sharing costs a trained model\n", 1)[1].split("\n## ", 1)[0]
    return section.split("\n### ", 1)[0]  # its subsections (e.g. "A small ViT") are other studies


# README row label -> the study's run name
README_ROWS = {
    "baseline (unshared, 272,186 parameters)": "baseline",
    "baseline fine-tuned on the same schedule (control)": "baseline + same fine-tune (control)",
    '`init="random"`': "random",
    '`init="first"`': "first",
    '`init="average"` (ShaResNet\'s suggestion)': "average",
    '`init="average"` + BatchNorm re-calibration (1,024 images)': "average + BN recal.",
    '`init="scaled"`': "scaled",
    '`init="average", align=True`': "aligned average",
    '`init="average", align=True` + BatchNorm re-calibration': "aligned average + BN recal.",
    '`init="scaled", align=True`': "aligned scaled",
    '`init="scaled", align=True` + BatchNorm re-calibration': "aligned scaled + BN recal.",
    '`method="basis"`, `init="svd"`, S24U8 (36.9 % fewer)': "basis S24U8 (svd)",
    "shared ResNet-20 trained from scratch (10 epochs)": "shared, from scratch",
    "plain ResNet-14 from scratch, 174,970 parameters (10 epochs)": "plain ResNet-14, from scratch",
}


@pytest.mark.results
def test_readme_table_equals_study_json() -> None:
    """Every number of the README's table (accuracies, parameter counts, % fewer, epochs) is study.json's."""
    study = _committed()
    args = study_args(study)
    runs = {r["name"]: Run(**r) for r in study["runs"]}
    base = runs["baseline"]
    lines = [line for line in _readme_section().splitlines() if line.startswith("|")]
    header = "| variant (35.6 % fewer parameters unless noted) | before fine-tuning | after 1 epoch | after 5 epochs |"
    assert lines[:2] == [header, "|---|---:|---:|---:|"]

    def fewer(run: Run) -> str:
        return f"{100 * (1 - run.params / base.params):.1f} %"

    def fmt(acc: float | None) -> str:
        return "" if acc is None else f"{acc:.2f}"

    assert fewer(runs["average"]) == "35.6 %" and f"after {args.finetune_epochs} epochs" in header
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[0] for c in cells] == list(README_ROWS)
    best = max(r.top1(args.finetune_epochs) or 0.0 for r in runs.values() if r.kind == "variant")
    for label, before, one, five in cells:
        run = runs[README_ROWS[label]]
        if run.kind == "baseline":
            expected = [fmt(run.top1(args.baseline_epochs)), "", ""]
            assert f"{run.params:,} parameters" in label
        elif run.kind == "scratch":
            expected = ["", "", fmt(run.top1(args.baseline_epochs))]
            assert f"({args.baseline_epochs} epochs)" in label and len(run.metrics) == args.baseline_epochs
        else:
            expected = [fmt(run.top1(0)), fmt(run.top1(1)), fmt(run.top1(args.finetune_epochs))]
        # the best variant after fine-tuning is in bold
        bold = run.kind == "variant" and run.top1(args.finetune_epochs) == best
        assert [before, one, five.removeprefix("**").removesuffix("**")] == expected
        assert five.startswith("**") == bold
        # parameters: "35.6 % fewer" unless the label notes the count or another share
        if run.kind in ("baseline", "control"):
            assert run.params == base.params
        elif "parameters" in label:
            assert f"{run.params:,} parameters" in label
        elif "fewer" in label:
            assert f"({fewer(run)} fewer)" in label
        else:
            assert fewer(run) == "35.6 %"
        if "1,024 images" in label:
            assert args.bn_images == 1024
        if "S24U8" in label:
            assert (args.shared_rank, args.unique_rank) == (24, 8)
    assert "ResNet-20" in cells[-2][0] and args.depth == 20 and f"ResNet-{args.depth - 6}" in cells[-1][0]


@pytest.mark.results
def test_readme_findings_numbers_equal_study_json() -> None:
    """The summary's derived numbers: the re-calibrated aligned variants' range, the baseline, the control."""
    study = _committed()
    args = study_args(study)
    runs = {r["name"]: Run(**r) for r in study["runs"]}
    text = " ".join(_readme_section().split())  # the paragraphs, line breaks as spaces
    base = runs["baseline"].top1(args.baseline_epochs) or 0.0
    recal = sorted(runs[f"aligned {n} + BN recal."].top1(0) or 0.0 for n in ("average", "scaled"))
    gaps = sorted(base - acc for acc in recal)
    assert f"to {recal[0]:.1f}-{recal[1]:.1f} % ({gaps[0]:.1f}-{gaps[1]:.1f} pp below the baseline)" in text
    assert "to 85.7-85.8 % (4.3-4.4 pp below the baseline)" in text
    control = runs["baseline + same fine-tune (control)"].top1(args.finetune_epochs) or 0.0
    assert (
        f"The baseline ({base:.2f} %) is trained on a {args.subset:,}-image subset for {args.baseline_epochs} epochs "
        f"and is not converged: the control, the baseline given the same {args.finetune_epochs} extra fine-tune "
        f"epochs, gains {control - base:.2f} pp ({control:.2f} %)"
    ) in text
    best = runs["aligned scaled"].top1(args.finetune_epochs) or 0.0
    assert f"`align=True`, {best:.2f} %) is {best - base:.2f} pp above it" in text
    assert f"but {control - best:.2f} pp below the control" in text
    no_align = [runs[n].top1(0) or 0.0 for n in ("average + BN recal.", "scaled + BN recal.")]
    assert f"against {no_align[0]:.1f} % and {no_align[1]:.1f} % without alignment" in text
