"""The accuracy study: its smoke run (every step on a tiny synthetic Fashion-MNIST), and the committed
results — the markdown and study.json must say the same."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import accuracy_study
from benchmarks.accuracy_study_report import Run, run_dir_name, run_lambda_r, study_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "accuracy_study"


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + data.to(torch.uint8).numpy().tobytes())


def fake_fashion_mnist(root: Path, n: int = 96) -> Path:
    """Idx files in Fashion-MNIST's layout: images whose brightness encodes the label (learnable)."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix in ("train", "t10k"):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = (labels.view(-1, 1, 1) * 25 + torch.randint(0, 20, (n, 28, 28), generator=g)).clamp(0, 255)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


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


# --- the committed study: its markdown and study.json agree -------------------------------


def _committed() -> dict[str, Any]:
    return json.loads((RESULTS / "study.json").read_text())


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
