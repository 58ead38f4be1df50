"""The ViT study (``benchmarks.vit_study``): its smoke run does every step on a tiny ViT and fake Fashion-MNIST;
the committed results -- vit_study.md, study.json and the README's "A small ViT" table -- say the same (marker
``results``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from benchmarks import vit_study
from tests.conftest import ROOT
from tests.fake_data import fake_fashion_mnist

RESULTS = ROOT / "benchmarks" / "results" / "vit_study"
README = ROOT / "README.md"

ROWS = (
    "baseline",
    vit_study.CONTROL,
    vit_study.MINIVIT,
    vit_study.ALIGNED,
    vit_study.DISTILLED,
    vit_study.budget_name(0.75),
)


def test_vit_study_smoke(tmp_path: Path) -> None:
    data = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "out"
    assert vit_study.main(["--smoke", "--data-root", str(data), "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    runs = {r["name"]: r for r in study["runs"]}
    assert list(runs) == list(ROWS)
    base = runs["baseline"]
    assert [m["epoch"] for m in base["metrics"]] == [1]
    for name in ROWS[1:]:  # every other row: before any update (epoch 0) and after the fine-tune
        assert [m["epoch"] for m in runs[name]["metrics"]] == [0, 1], name
    # the control starts from the trained baseline itself, untouched
    assert runs[vit_study.CONTROL]["metrics"][0]["top1"] == base["metrics"][-1]["top1"]
    assert runs[vit_study.CONTROL]["params"] == base["params"]
    # MiniViT's pattern halves the blocks' Linear weights; alignment does not change the count; a budget sits between
    shared = runs[vit_study.MINIVIT]["params"]
    assert shared == runs[vit_study.ALIGNED]["params"] == runs[vit_study.DISTILLED]["params"] < base["params"]
    assert shared < runs[vit_study.budget_name(0.75)]["params"] <= 0.75 * base["params"]
    # the distilled row fine-tunes the same aligned model: same starting accuracy, and a teacher was logged
    assert runs[vit_study.DISTILLED]["metrics"][0]["top1"] == runs[vit_study.ALIGNED]["metrics"][0]["top1"]
    assert "teacher_top1" in runs[vit_study.DISTILLED]["metrics"][0]
    assert runs[vit_study.DISTILLED]["options"]["distill"] is True
    assert runs[vit_study.ALIGNED]["options"] == {"preset": "minivit", "align": True, "distill": False}
    groups = runs[vit_study.MINIVIT]["groups"]
    assert len(groups) == 8 and all(len(g["members"]) == 2 and g["delta_rank"] == 0 for g in groups)
    assert any(g["delta_rank"] for g in runs[vit_study.budget_name(0.75)]["groups"])
    # what the run records: command, commit, machine, data, seed
    assert study["command"].startswith("python -m benchmarks.vit_study --smoke")
    assert study["git_commit"] and study["machine"]["torch_threads"] == 1
    assert study["data"] == {"source": str(data), "train_images": 96, "val_images": 96, "classes": 10}
    assert study["args"]["seed"] == 0 and study["args"]["width"] == 32
    table = (out / "vit_study.md").read_text()
    assert table == vit_study.render_markdown(study)
    for row in vit_study.table(study)[2:]:
        assert row in table
    assert f"Command: `{study['command']}`" in table and f"git commit `{study['git_commit']}`" in table
    assert '| `preset="minivit", align=True` + distillation | ' in table
    assert (out / "runs" / "baseline" / "metrics.jsonl").exists()
    assert (out / "runs" / "preset-minivit-align-true" / "report.md").exists()
    assert not (out / "runs" / "baseline" / "checkpoints").exists()  # weights are not results


# --- the committed study: vit_study.md, study.json and the README agree (marker `results`) ---------------------


def _committed() -> dict[str, Any]:
    return json.loads((RESULTS / "study.json").read_text())


@pytest.mark.results
def test_committed_markdown_is_rewritten_from_study_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--from-json` rewrites vit_study.md from study.json alone; the committed markdown is exactly that text."""
    shutil.copy(RESULTS / "study.json", tmp_path / "study.json")
    assert vit_study.main(["--from-json", str(tmp_path / "study.json")]) == 0
    text = (tmp_path / "vit_study.md").read_text()
    assert capsys.readouterr().out == text + "\n"
    assert text == (RESULTS / "vit_study.md").read_text()


@pytest.mark.results
def test_committed_table_figures_are_study_json() -> None:
    """Each row of the committed table: the run's parameter count, its top-1 before and after the fine-tune."""
    study = _committed()
    args = study["args"]
    runs = {r["name"]: r for r in study["runs"]}
    assert list(runs) == list(ROWS) and args["finetune_epochs"] >= 1
    lines = [line for line in (RESULTS / "vit_study.md").read_text().splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert len(cells) == len(ROWS)
    for row, name in zip(cells, ROWS):
        run = runs[name]
        top1 = {m["epoch"]: m["top1"] for m in run["metrics"]}
        assert row[1] == f"{run['params']:,}"
        if name == "baseline":
            assert row[3] == f"{top1[args['baseline_epochs']]:.2f}" and not row[4]
        else:
            assert (
                row[3] == f"{top1[0]:.2f}"
                and row[3 + args["finetune_epochs"]] == f"{top1[args['finetune_epochs']]:.2f}"
            )
    assert study["command"] == "python -m benchmarks.vit_study"  # the committed run is the default one


def _readme_subsection() -> str:
    return README.read_text().split("\n### A small ViT\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


@pytest.mark.results
def test_readme_subsection_is_the_committed_table() -> None:
    """The README's "A small ViT" rows are the committed table's, verbatim; its command and figures are the study's."""
    study = _committed()
    committed = (RESULTS / "vit_study.md").read_text()
    section = _readme_subsection()
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows == vit_study.table(study) and all(row in committed for row in rows)
    text = " ".join(section.split())
    assert f"`{study['command']}`" in text
    assert f"{study['seconds'] / 60:.0f} min" in text
    data = study["data"]
    assert f"{data['train_images']:,} training images" in text and f"{data['val_images']:,} test images" in text
    args = study["args"]
    assert f"{args['depth']}-block, {args['width']}-wide" in text and f"{args['patch']}x{args['patch']} patches" in text
    assert (
        f"{args['heads']} heads, MLP ratio {args['mlp_ratio']:g}" in text
        and f"{args['baseline_epochs']} epochs)" in text
    )
    lr = f"{args['finetune_lr']:.0e}".replace("e-0", "e-")
    assert f"({args['finetune_epochs']} epochs, AdamW, lr {lr}, no warm-up)" in text
    runs = {r["name"]: vit_study.VitRun(**r) for r in study["runs"]}
    assert f"{runs['baseline'].params / 1e6:.2f} M parameters" in text
    last = args["finetune_epochs"]
    base = runs["baseline"].top1(args["baseline_epochs"]) or 0.0
    control = runs[vit_study.CONTROL].top1(last) or 0.0
    plain, aligned = runs[vit_study.MINIVIT], runs[vit_study.ALIGNED]
    distilled, budget = runs[vit_study.DISTILLED], runs[vit_study.budget_name(0.75)]
    figures = [
        f"from {base:.2f} % to {plain.top1(0):.2f} %; `align=True` lifts that to {aligned.top1(0):.2f} %",
        f"member error only from {plain.dissimilarity:.3f} to {aligned.dissimilarity:.3f}",
        f"full sharing to {plain.top1(last):.2f} % ({aligned.top1(last):.2f} % aligned), "
        f"{control - (aligned.top1(last) or 0.0):.2f} pp below the control ({control:.2f} %)",
        f"control itself ends {base - control:.2f} pp below the baseline",
        f"({runs[vit_study.CONTROL].top1(1):.2f} % after one epoch)",
        f"`param_budget=0.75` ({100 * (1 - budget.params / runs['baseline'].params):.0f} % fewer parameters) keeps "
        f"{budget.top1(0):.2f} % with no training",
        f"({budget.top1(last):.2f} %) is the best shared row, {(budget.top1(last) or 0.0) - control:.2f} pp above",
        f"lowered the aligned row from {aligned.top1(last):.2f} % to {distilled.top1(last):.2f} %",
    ]
    for figure in figures:
        assert figure in text, figure
    best = max((r for r in runs.values() if r.kind == "variant"), key=lambda r: r.top1(last) or 0.0)
    assert best is budget
