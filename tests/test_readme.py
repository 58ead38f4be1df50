"""The README's Python examples run as written, and its two commands exist.

The figures of the README checked against the committed benchmark results carry the ``results`` marker.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import torch

import sharify
from tests.conftest import ROOT

README = ROOT / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    api = next(b for b in _blocks("python") if "sharify.plan(model)" in b)
    exec(compile(api, "README.md", "exec"), namespace)
    persistence = next(b for b in _blocks("python") if "sharify.save(" in b)
    exec(compile(persistence, "README.md", "exec"), namespace)  # continues with the API example's model
    assert namespace["problems"] == [] and (tmp_path / "r34_shared.safetensors").exists()


def test_readme_foreign_models_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    block = next(b for b in _blocks("python") if "ResNetForImageClassification" in b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the detector's "analysed its submodules instead" and "no source" warnings
        exec(compile(block, "README.md", "exec"), namespace)
    det, restored, shared_det = namespace["det"], namespace["restored"], namespace["shared_det"]
    assert isinstance(namespace["shared_hf"], type(namespace["hf"]))
    submodules = sharify.plan(namespace["fresh"]).submodules  # what the README's comment shows
    assert submodules["backbone"].startswith("analysed with inputs (1, 3, 800, 800)")
    assert sharify.shared_groups(shared_det) and sharify.verify(shared_det) == []
    assert list(sharify.shared_groups(restored)) == list(sharify.shared_groups(det))
    assert all(k.startswith("backbone.body.") for k in sharify.shared_groups(det))
    assert restored.state_dict().keys() == det.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), det.state_dict().values()))


def test_readme_deploy_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    block = next(b for b in _blocks("python") if "sharify.fold_batchnorm(" in b)
    exec(compile(block, "README.md", "exec"), namespace)
    folded, int8 = namespace["folded"], namespace["int8"]
    holders = [m for m in int8.modules() if type(m).__name__ == "Int8SharedConvParams"]  # type: ignore[union-attr]
    assert holders and len(holders) == len(sharify.shared_groups(folded))  # type: ignore[arg-type]
    assert (tmp_path / "resnet18_shared.onnx").stat().st_size < 0.75 * 46.8e6  # checked by export_onnx itself
    assert (tmp_path / "resnet18_int8.onnx").stat().st_size < 0.75 * 11.8e6  # one int8 initializer per weight


@pytest.mark.results
def test_readme_onnx_figures_are_the_committed_deploy_benchmark() -> None:
    deploy = (README.parent / "benchmarks/results/deploy.md").read_text()
    rows = _table_after("- **ONNX and `torch.export`**", "model")
    assert [r[0] for r in rows] == ["resnet18", "resnet34", "resnet50", "wrn-40-4", "resnet34-dsfb-basis"]
    for model, fraction, onnx, int8_onnx, pt2, safetensors, latency in rows:
        line = next(x for x in deploy.splitlines() if x.startswith(f"| {model} | 3x"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == fraction, model
        assert cells[5].startswith(f"{safetensors} = "), model
        assert cells[6].startswith(f"{onnx.replace(' (', ' = ').rstrip(')')}"), model
        assert cells[7].startswith(f"{pt2} = "), model
        assert cells[9].startswith(f"{int8_onnx.replace(' (', ' = ').rstrip(')')}"), model
        ratios = [
            next(x for x in deploy.splitlines() if x.startswith(f"| {model} | shared | {b} | original |"))
            .split("|")[7]
            .strip()
            for b in (1, 8)
        ]
        assert latency == " / ".join(ratios), model


@pytest.mark.results
def test_readme_deploy_figures_are_the_committed_benchmarks() -> None:
    section = README.read_text().split("## Deploying a shared model", 1)[1].split("\n## ", 1)[0]
    folding = (README.parent / "benchmarks/results/folding.md").read_text()
    for row in re.findall(r"^  \| (?:torchvision|CIFAR)[^\n]*", section, flags=re.M):
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        name = cells[0].replace("`dsfb-basis` S48U1", "filter basis (dsfb-basis S48U1)")
        line = next(line for line in folding.splitlines() if line.startswith(f"| {name}"))
        assert [c.strip() for c in line.strip("|").split("|")][1:] == cells[1:], name
    speed = (README.parent / "benchmarks/results/deploy_folding.md").read_text()
    ratios = re.findall(
        r"\| (resnet\d+) \| \S+ \| (True|False) \| `torch_fused_original` \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", speed
    )
    by = {(m, c): r for m, c, r in ratios}
    assert f"{by['resnet18', 'False']} / {by['resnet50', 'False']} eager" in " ".join(section.split())
    assert f"{by['resnet18', 'True']} / {by['resnet50', 'True']} under" in " ".join(section.split())
    for model, original, shared in re.findall(
        r"\| (resnet\d+) \| [^|]+ \| [^|]+ \| ([\d.]+) / ([\d.]+) \([\d.]+\) MiB \| [^|]+ \|$", speed, flags=re.M
    ):
        assert f"{model} {original} -> {shared} MiB" in " ".join(section.split()), model


@pytest.mark.results
def test_readme_int8_accuracy_figures_are_the_committed_benchmark() -> None:
    import json

    results = json.loads((README.parent / "benchmarks/results/int8_accuracy.json").read_text())
    rows = _table_after("`python -m benchmarks.int8_accuracy`", "model")
    expected = [
        [r["model"], f"{r['params']:,}", f"{r['float_top1']:.2f}", f"{r['int8_top1']:.2f}", f"{r['agreement']:.2f}"]
        for r in results["accuracy"]
    ]
    assert rows == expected
    section = " ".join(README.read_text().split("`python -m benchmarks.int8_accuracy`", 1)[1].split()[:400])
    for model in ("original", "shared"):
        ratios = [f"{r['ratio']:.2f}" for r in results["speed"] if r["model"] == model]
        assert f"{model} {' / '.join(ratios)}" in section, model
    logged = results["finetune_top1"]["shared"]
    assert f"{logged[0]:.2f} % after BatchNorm re-calibration" in section


def test_readme_commands_are_the_ci_commands() -> None:
    commands = [b.strip() for b in _blocks("bash")]
    assert "python -m pip install -e . && sharify report resnet50" in commands
    test_command = 'python -m pip install -e ".[test]" && python -m pytest'
    assert test_command in commands
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci
    # the checks of the committed results, deselected by the default run, are CI's next step
    assert ci.index("\npython -m pytest -m results\n") > ci.index(test_command)


def test_readme_command_sharify_report_resnet50_prints_the_table() -> None:
    # The README's main command, verbatim, through the installed console script (this checkout first on
    # the path, so an editable install of another checkout does not answer for this one).
    script = next(
        (p for p in (Path(sys.executable).parent / n for n in ("sharify", "sharify.exe")) if p.exists()), None
    )
    if script is None:
        pytest.skip("no `sharify` console script next to the interpreter (install the project: pip install -e .)")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(README.parent), os.environ.get("PYTHONPATH")])),
    }
    lines = subprocess.run([str(script), "report", "resnet50"], capture_output=True, text=True, check=True,
                           env=env).stdout.splitlines()  # fmt: skip
    assert lines[:2] == ["torchvision:resnet50", "ResNet: 25,557,032 -> 20,469,800 parameters (-19.9%)"]
    rows = [line.split() for line in lines]
    assert rows[2] == ["stage", "groups", "members", "params", "before", "params", "after", "saved", "(of", "model)"]
    assert rows[4:8] == [
        ["layer1", "1", "3", "110,592", "36,864", "73,728", "(-0.3%)"],
        ["layer2", "1", "3", "442,368", "147,456", "294,912", "(-1.2%)"],
        ["layer3", "1", "5", "2,949,120", "589,824", "2,359,296", "(-9.2%)"],
        ["layer4", "1", "2", "4,718,592", "2,359,296", "2,359,296", "(-9.2%)"],
    ]
    assert rows[9] == ["group", "members", "weight", "params", "before", "params", "after", "saved", "dissimilarity"]
    assert [r[:6] for r in rows[11:15]] == [
        ["layer1.conv2", "3", "64x64x3x3", "110,592", "36,864", "73,728"],
        ["layer2.conv2", "3", "128x128x3x3", "442,368", "147,456", "294,912"],
        ["layer3.conv2", "5", "256x256x3x3", "2,949,120", "589,824", "2,359,296"],
        ["layer4.conv2", "2", "512x512x3x3", "4,718,592", "2,359,296", "2,359,296"],
    ]
    assert all(0.5 < float(r[6]) < 1 for r in rows[11:15])  # dissimilarity of independent random members
    assert rows[16] == ["total", "(model)", "25,557,032", "20,469,800", "5,087,232", "(-19.9%)"]
    assert lines[17].startswith("after conv-BN folding (deployment): 20,472,680 parameters (-19.9%)")


def test_cli_report_resnet50_json_and_resnet18_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from sharify.cli import main

    out = subprocess.run([sys.executable, "-m", "sharify", "report", "resnet50", "--json"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    data = json.loads(out)
    assert data["params_before"] == 25_557_032 and data["params_after"] == 20_469_800
    assert 0.19 < data["reduction"] < 0.2 and len(data["groups"]) == 4
    assert main(["report", "tv:resnet18", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith(
        "| stage | groups | members | params before | params after | saved (of model) |\n|---|---|---|---|---|---|\n"
        "| layer1 | 1 | 2 | 73,728 | 36,864 | 36,864 (-0.3%) |\n"
    )
    assert "| group | members | weight | params before | params after | saved | dissimilarity |" in markdown
    assert "| layer4.conv2 | 2 | 512x512x3x3 | 4,718,592 | 2,359,296 | 2,359,296 | 0.7" in markdown
    assert "| total (model) |  |  | 11,689,512 | 8,556,072 | 3,133,440 (-26.8%) |  |" in markdown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "resnet5O"], "unknown model 'resnet5O'.*did you mean"),
        (["report", "vgg11"], "no residual blocks found in VGG"),
        (["report", "resnet18", "--preset", "dsfb-basis"], "--method basis needs --shared-rank"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code(argv: list[str], message: str, capsys) -> None:
    from sharify.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and err.count("\n") == 0 and "Traceback" not in err


def _table_after(heading: str, first_column: str) -> list[list[str]]:
    """Rows (cells) of the first markdown table under ``heading`` whose header starts with ``first_column``."""
    section = README.read_text().split(heading, 1)[1]
    lines = [line.strip() for line in section.splitlines()]  # tables may be indented under a list item
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_readme_options_table_is_the_sharing_options_fields() -> None:
    """The table of options names every field of `SharingOptions` with its default and each valid value, and the
    other arguments of `sharify()`."""
    from dataclasses import fields

    from sharify.planning.options import DEFAULT_PRESET, METHODS, PRESETS, SELECTORS, SharingOptions

    rows = _table_after("Options of `sharify.sharify` / `sharify.plan`", "option")
    table = {name.strip("`"): (default, meaning) for names, default, meaning in rows for name in names.split(", ")}
    params = set(inspect.signature(sharify.sharify).parameters) - {"model", "options", "preset", "overrides"}
    assert set(table) == {f.name for f in fields(SharingOptions)} | params

    def shown(value: object) -> str:
        return "—" if value is None else f"`{value!r}`".replace("'", '"')

    ranks = {"shared_rank": 1, "unique_rank": 1}
    inits = [SharingOptions(method="share").init, SharingOptions(method="basis", **ranks).init]
    special = {"preset": shown(DEFAULT_PRESET), "init": " / ".join(map(shown, inits))}
    for f in fields(SharingOptions):
        assert table[f.name][0] == special.get(f.name, shown(f.metadata["default"])), f.name
    valid = {"preset": list(PRESETS), "method": METHODS, "positions": SELECTORS}
    valid["init"] = typing.get_args(typing.get_type_hints(SharingOptions)["init"])
    for name, values in valid.items():
        meaning = table[name][1]
        assert all(f"`{v}`" in meaning or f'`"{v}"`' in meaning for v in values), name


@pytest.mark.results
def test_readme_coverage_figures_are_the_committed_sweep() -> None:
    import json
    from collections import Counter

    from benchmarks.coverage_summary import headline

    data = json.loads((README.parent / "benchmarks/results/coverage.json").read_text())
    # The README's figures are those of the classification zoos; its error count is that of every source.
    rows = [r for r in data["models"] if r.get("source", r["library"]) in ("torchvision", "timm")]
    text = README.read_text()
    parts = headline(rows).split(", ")  # "28 of 80 torchvision models shared", "415 of 1371 timm ...", "0 errors"
    tv, timm_ = (p.removesuffix(" models shared") for p in parts[:2])
    errors = headline(data["models"]).split(", ")[-1]
    assert f"**{tv} models and {timm_} models are shared, {errors}**" in text
    assert f"({data['meta']['wall_seconds'] / 60:.0f} min on 2 cores)" in text
    refused = Counter(r["reason_kind"] for r in rows if r["outcome"] == "nothing-to-share")
    kinds = {  # README wording -> the sweep's reason kind
        "no residual blocks": "no residual blocks",
        "only Linear layers in the branches (transformers, MLP models)": "linear only (try preset='minivit')",
        "only depthwise spatial convs in the branches": "depthwise only",
        "no two consecutive blocks of one shape": "no multi-block stage",
        "only pointwise convs in the branches": "pointwise only",
        "some parts untraceable, none of the analysed ones residual": "no residual blocks in the analysed parts",
        "untraceable": "untraceable",
        "no two convs of one signature in a stage": "no same-signature convs",
        "convs reused across blocks": "convs reused across blocks",
    }
    table = {r[0]: int(r[1]) for r in _table_after("## Which models it works on", "refusal")}
    assert table == {wording: refused[kind] for wording, kind in kinds.items()}
    hinted = [r for r in rows if "(suggested)" in r["alternative"]]
    assert not any(r["misleading_hint"] for r in hinted)
    assert f"{len(hinted)} refusals suggest something, and every\nsuggestion shares" in text
    for family, n, mean, best in _table_after("## Which models it works on", "family"):
        library, module = family.split()[:2]
        shared = [r for r in rows if r["family"] == f"{library}.{module.strip('`')}" and r["outcome"] == "shared"]
        assert int(n) == len(shared), family
        assert mean == f"{100 * sum(r['reduction'] for r in shared) / len(shared):.1f} %", family
        assert best == f"{100 * max(r['reduction'] for r in shared):.1f} %", family


@pytest.mark.results
def test_readme_foreign_source_figures_are_the_committed_sweep() -> None:
    import json

    data = json.loads((README.parent / "benchmarks/results/coverage.json").read_text())
    table = _table_after("## Models from other libraries and models inside models", "source")
    sources = [r[0].strip("`") for r in table]
    assert sources == [
        "torchvision-detection",
        "torchvision-segmentation",
        "torchvision-video",
        "torchvision-optical-flow",
        "transformers",
    ]
    for source, (_, models, shared, refused, skipped, errors, shared_names) in zip(sources, table):
        rows = [r for r in data["models"] if r.get("source") == source]
        count = {o: sum(r["outcome"] == o for r in rows) for o in ("shared", "nothing-to-share", "skipped", "error")}
        assert [int(models), int(shared), int(refused), int(skipped), int(errors)] == [
            len(rows),
            count["shared"],
            count["nothing-to-share"],
            count["skipped"],
            count["error"],
        ], source
        names = sorted(r["name"] for r in rows if r["outcome"] == "shared")
        assert shared_names == (", ".join(f"`{n}`" for n in names) or "-"), source


@pytest.mark.results
def test_readme_performance_figures_are_the_committed_benchmark() -> None:
    import json
    import statistics

    results = README.parent / "benchmarks/results"
    perf = json.loads((results / "perf.json").read_text())
    recheck = json.loads((results / "perf_recheck_wrn-28-10/perf.json").read_text())
    text = " ".join(README.read_text().split("## Performance", 1)[1].split("## How it works")[0].split())
    speed = perf["speed"]
    ratios = [r["ratio"] for r in speed]
    verdicts = [r["verdict"] for r in speed]
    assert f"Over {len(speed)} configurations" in text
    assert f"is {statistics.median(ratios):.3f} ({min(ratios):.3f} to {max(ratios):.3f})" in text
    assert f"{verdicts.count('met')} meet the 0.98 target and {verdicts.count('noise')} fall short" in text
    assert "below" not in verdicts
    worst = min(speed, key=lambda r: r["ratio"])
    assert (worst["model"], worst["mode"]) == ("wrn-28-10", "inference") and f"at {worst['ratio']:.3f}" in text
    again = next(r for r in recheck["speed"] if r["mode"] == "inference")
    ci = again["ratio_ci95"]
    assert again["repeats"] == 61 and f"gives {again['ratio']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" in text
    overhead = perf["overhead"]
    member = statistics.mean(r["member_read_s"] for r in overhead) * 1e6
    plain = statistics.mean(r["plain_read_s"] for r in overhead) * 1e6
    assert f"about {member:.2f} against {plain:.2f} µs per call" in text
    memory = {r["model"]: r for r in perf["memory"]}
    for r in memory.values():
        exact = (r["param_bytes_ratio"], r["sgd_state_bytes_ratio"], r["adamw_state_bytes_ratio"])
        assert exact == (r["param_fraction"],) * 3
        assert abs(r["checkpoint_bytes_ratio"] - r["param_fraction"]) < 0.002
    for name, label in (("resnet50", "resnet50"), ("resnet152", "resnet152"), ("wrn-28-10", "WRN-28-10")):
        assert f"{label} {memory[name]['param_fraction']:.3f}" in text
    shares = [r["peak"]["saving_bytes"] / r["peak"]["predicted_saving_bytes"] for r in memory.values()]
    assert f"by {100 * min(shares):.0f}-{100 * max(shares):.0f} % of the saved" in text
    peak = memory["resnet152"]["peak"]
    assert f"{peak['original_peak_bytes'] / 2**20:.0f} → {peak['shared_peak_bytes'] / 2**20:.0f} MiB" in text
    times = {r["model"]: r for r in perf["sharify_time"]}
    big = times["resnetv2_152x4_bit"]
    assert f"takes {times['resnet50']['seconds']:.2f} s on resnet50, {times['resnet152']['seconds']:.2f} s" in text
    assert f"{big['seconds']:.1f} s on a {big['params'] / 1e6:.0f} M-parameter" in text
    growth = next(r for r in perf["analysis_memory"] if r["model"] == "resnetv2_152x4_bit")["peak_rss_growth_bytes"]
    assert f"grows the process by {growth / 2**20:.0f} MiB" in text


def test_readme_transformer_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    import torch

    import sharify

    with torch.device("meta"):  # the comment's figures: the architecture's counts, no weights needed
        plan = sharify.plan(timm.create_model("deit_small_patch16_224"), preset="minivit")
    assert (round(plan.params_before / 1e6, 1), round(plan.params_after / 1e6, 1)) == (22.1, 11.4)
    # The block itself on a narrower DeiT (12 blocks of width 96 at 64 px), so that aligning and the budget's
    # SVDs take seconds: the same calls, the same code paths.
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name: create(name, embed_dim=96, num_heads=2, img_size=64))
    namespace: dict[str, object] = {}
    block = next(b for b in _blocks("python") if 'preset="minivit"' in b)
    torch.manual_seed(0)
    exec(compile(block, "README.md", "exec"), namespace)
    vit, mini, whole, aligned = (namespace[k] for k in ("vit", "mini", "whole", "aligned"))
    assert len(sharify.shared_groups(mini)) == 4 * 6 and len(sharify.shared_groups(whole)) == 2
    budget = sharify.report(vit, aligned)
    assert 0.55 * budget.params_before < budget.params_after <= 0.6 * budget.params_before
