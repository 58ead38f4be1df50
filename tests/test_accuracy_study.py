"""The accuracy study's smoke run: every step of the study on a tiny synthetic Fashion-MNIST."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import torch

from benchmarks import accuracy_study


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
