"""Coverage of the model zoos, on a representative subset (the full sweep is benchmarks/coverage.py).

Each model is checked by :func:`benchmarks.coverage_check.check_model`: built on the meta device, planned
and sharified (report arithmetic == plan arithmetic); shared models up to 30 M parameters (except those in
``META_ONLY``) are also built for real, sharified, and run forward/backward on a 64-px input with the output
shapes compared to the original's and gradients required on every shared weight. The same is done with
``preset="minivit"`` (the sweep's MiniViT pass). The expected outcome of each model is part of the test: a
model that stops being shared, or starts being refused for another reason, fails it; so does one that starts
or stops needing automatic leafing or the meta-build fallback, or whose MiniViT outcome changes.
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import benchmarks.coverage_check
import sharify
from benchmarks.coverage import list_models, main, merge_results, parse_sources, run_sweep, write_results
from benchmarks.coverage_check import LINEAR_ONLY, NO_RESIDUAL_SEEN, ModelResult, _kind_of, _real_inputs, check_model
from benchmarks.coverage_sources import MissingPackageError, build, family_of
from benchmarks.coverage_summary import (
    OTHER_LINEAR,
    OTHER_TRANSFORMERS,
    errors_of,
    headline,
    minivit_headline,
    summary_markdown,
    transformer_family,
    transformer_family_rows,
)
from tests.conftest import ROOT

SHARED = "shared"
DEPTHWISE = "depthwise only"
NO_RESIDUAL = "no residual blocks"
ONE_BLOCK_STAGES = "no multi-block stage"
NO_SAME_SIGNATURE = "no same-signature convs"
POINTWISE = "pointwise only"
NO_CONV_OR_LINEAR = "no conv or linear layers"
LINEAR = LINEAR_ONLY  # residual branches of nn.Linear layers (transformer and MLP blocks): preset='minivit'
UNTRACEABLE = "untraceable"

# (source, model, expected outcome: "shared" or the kind of nothing-to-share reason)
SUBSET = [
    ("torchvision", "resnet18", SHARED),
    ("torchvision", "resnext50_32x4d", SHARED),
    ("torchvision", "regnet_y_400mf", SHARED),
    ("torchvision", "efficientnet_v2_s", SHARED),  # FusedMBConv: dense 3x3 convs in the early stages
    ("torchvision", "mobilenet_v3_small", DEPTHWISE),
    ("torchvision", "densenet121", NO_RESIDUAL),
    ("torchvision", "vgg11", NO_RESIDUAL),
    ("torchvision", "swin_t", LINEAR),
    ("timm", "resnet18d", SHARED),
    ("timm", "resnet10t", ONE_BLOCK_STAGES),
    ("timm", "seresnext26d_32x4d", SHARED),
    ("timm", "ecaresnet26t", SHARED),
    ("timm", "ecaresnet50d_pruned", NO_SAME_SIGNATURE),  # pruning gives every block its own widths
    ("timm", "legacy_seresnet18", SHARED),
    ("timm", "resnetv2_50", SHARED),  # pre-activation
    ("timm", "regnetx_002", SHARED),
    ("timm", "res2net50_14w_8s", SHARED),  # several adds per block
    ("timm", "resnest14d", ONE_BLOCK_STAGES),
    ("timm", "resnest26d", SHARED),
    ("timm", "skresnet18", SHARED),
    ("timm", "dla34", SHARED),  # tree aggregation
    ("timm", "cspresnet50", SHARED),
    ("timm", "cs3darknet_focus_m", SHARED),
    ("timm", "hrnet_w18_small", SHARED),
    ("timm", "nf_resnet26", SHARED),  # ScaledStdConv2d, x * alpha + shortcut
    ("timm", "nfnet_f0", SHARED),  # 71 M parameters: meta device only
    ("timm", "dpn48b", SHARED),  # dual path
    ("timm", "repvgg_a0", SHARED),  # parallel 3x3/1x1/identity branches
    ("timm", "gernet_s", SHARED),
    ("timm", "tf_efficientnetv2_s", SHARED),  # Conv2dSame
    ("timm", "tresnet_m", SHARED),  # space-to-depth stem
    ("timm", "inception_resnet_v2", SHARED),
    ("timm", "rexnet_100", ONE_BLOCK_STAGES),  # channels grow in every block
    ("timm", "ghostnet_100", DEPTHWISE),
    ("timm", "efficientnet_b0", DEPTHWISE),
    ("timm", "mobilenetv3_small_050", DEPTHWISE),
    ("timm", "convnext_atto", DEPTHWISE),
    ("timm", "poolformer_s12", POINTWISE),  # pooling mixer + 1x1-conv MLP
    ("timm", "levit_conv_128", POINTWISE),
    ("timm", "vit_tiny_patch16_224", LINEAR),
    ("timm", "bat_resnext26ts", SHARED),  # untraceable attention (data-dependent) leafed automatically
    ("timm", "resnetv2_50x1_bit", SHARED),  # StdConv2d (weight standardised in its own forward)
    ("torchvision", "mobilenet_v2", DEPTHWISE),
    ("timm", "ese_vovnet39b", ONE_BLOCK_STAGES),  # one residual OSA module per stage
    ("timm", "xception41p", DEPTHWISE),
    # The other sources (benchmarks/coverage_sources.py), called as a user would: sharify.plan(model).
    ("torchvision-segmentation", "fcn_resnet50", SHARED),
    ("torchvision-segmentation", "lraspp_mobilenet_v3_large", DEPTHWISE),
    ("torchvision-video", "r3d_18", NO_RESIDUAL),  # Conv3d blocks (not analysed) and a Linear head: traced
    # Hugging Face forwards trace whole with their defaults; untraceable roots (detectors, RAFT) are analysed
    # through their submodules.
    ("transformers", "resnet", SHARED),
    ("transformers", "convnext", DEPTHWISE),
    ("torchvision-detection", "fasterrcnn_resnet50_fpn", SHARED),  # the backbone's stages
    ("torchvision-optical-flow", "raft_small", SHARED),
    ("torchvision-detection", "fasterrcnn_mobilenet_v3_large_320_fpn", UNTRACEABLE),  # no part shares
]

FORWARD_MAX_PARAMS = 30_000_000

# The models of SUBSET that preset="minivit" shares (the sweep's MiniViT pass): transformer blocks and the
# Linear MLPs of Hugging Face's ConvNeXt; every other model of SUBSET is refused with it (untraceable roots
# whose parts hold no Linear branches: UNTRACEABLE).
MINIVIT_SHARED = {"swin_t", "vit_tiny_patch16_224", "convnext"}

# Shared models analysed on the meta device only: their real check takes 10-20 s on two cores (it passes in
# the full sweep, benchmarks/results/coverage.csv); what is particular about them is analysis. StdConv2d's
# real-weight analysis is also tested in tests/analysis/test_trace_and_shapes.py.
META_ONLY = {"bat_resnext26ts", "resnetv2_50x1_bit"}

# Models with submodules torch.fx cannot trace, leafed automatically (every other model but the UNTRACEABLE
# ones traces whole).
# (transformers' embedders, `if num_channels != self.num_channels: raise`, trace since that Python control flow is
# decided on the fake tensors of the analysis inputs.)
AUTO_LEAFED = {
    "bat_resnext26ts": [f"stages.{s}.{b}.attn.ba" for s in range(4) for b in range(2)],
}

# Builders that compute with tensors and cannot run under `torch.device("meta")`: their parameters and
# buffers are moved to meta as they are registered (every other model builds under the meta device).
MOVED_AT_REGISTRATION = {"regnet_y_400mf"}  # torchvision's RegNet widths are computed with torch ops

# Hand arithmetic: per stage of the default rule, (members - 1) * weight size of the 3x3 conv2 (no bias);
# ResNet-18's four stages have two basic blocks each, 64..512 channels.
_R18_SAVED = sum((2 - 1) * c * c * 3 * 3 for c in (64, 128, 256, 512))
EXACT_PARAMS = {  # (params_before, params_after)
    "torchvision:resnet18": (11_689_512, 11_689_512 - _R18_SAVED),
    "timm:resnet18d": (11_708_744, 11_708_744 - _R18_SAVED),  # deep stem and avg-pool shortcut: more before
}


@pytest.mark.parametrize(("source", "name", "expected"), SUBSET, ids=[f"{src}:{n}" for src, n, _ in SUBSET])
def test_model_outcome(source: str, name: str, expected: str) -> None:
    forward_max_params = 0 if name in META_ONLY else FORWARD_MAX_PARAMS
    result = check_model(source, name, forward_max_params=forward_max_params, input_px=64)
    assert result.outcome != "error", f"{result.reason_kind}: {result.reason}"
    assert not result.misleading_hint, f"the refusal suggests options that share nothing: {result.alternative}"
    assert result.build == ("meta (moved at registration)" if name in MOVED_AT_REGISTRATION else "meta")
    traced = (
        "no"
        if expected == UNTRACEABLE
        else "auto-leaf: " + ", ".join(AUTO_LEAFED[name])
        if name in AUTO_LEAFED
        else "yes"
    )
    assert result.traced == traced
    if f"{source}:{name}" in EXACT_PARAMS:
        assert (result.params_before, result.params_after) == EXACT_PARAMS[f"{source}:{name}"]
    if expected == SHARED:
        assert result.outcome == "shared", result.reason
        assert result.groups >= 1 and result.members >= 2 * result.groups
        assert result.params_after < result.params_before
        if result.params_before <= forward_max_params:
            assert result.real_check == "passed"  # output shapes and shared-weight gradients checked inside
        else:
            assert result.real_check.startswith("skipped")
    else:
        assert (result.outcome, result.reason_kind) == ("nothing-to-share", expected), result.reason
        assert result.params_after == result.params_before and result.reason
        # The refusal's suggestion works: the option it names shares something.
        hint = {
            DEPTHWISE: "depthwise=True (suggested): ",
            POINTWISE: "positions='last' (suggested): ",
            LINEAR: "preset='minivit' (suggested): ",
        }.get(expected)
        if hint is not None:
            assert hint in result.alternative and f"{hint}nothing" not in result.alternative, result.alternative
    # The MiniViT pass: the same checks with preset="minivit".
    if name in MINIVIT_SHARED:
        assert result.minivit_outcome == "shared", result.minivit_reason
        assert result.minivit_groups >= 1 and result.minivit_members >= 2 * result.minivit_groups
        assert result.minivit_params_after < result.params_before
        assert result.minivit_reduction == pytest.approx(1 - result.minivit_params_after / result.params_before)
        want = "passed" if result.params_before <= forward_max_params else "skipped"
        assert result.minivit_real_check.startswith(want)
    else:
        assert result.minivit_outcome == "nothing-to-share", f"{result.minivit_reason_kind}: {result.minivit_reason}"
        assert result.minivit_params_after == result.params_before and result.minivit_reason
        assert (result.minivit_groups, result.minivit_real_check) == (0, "")
        if expected == UNTRACEABLE:
            assert result.minivit_reason_kind == UNTRACEABLE


def test_minivit_pass_on_a_small_vit() -> None:
    # DeiT-Ti / ViT-Ti (12 blocks of 192 channels, MLP 768): refused by the defaults, whose message suggests
    # preset='minivit'; the MiniViT pass shares its 4 Linear layers (qkv, proj, fc1, fc2, weight and bias) in
    # each of the 6 runs of two blocks, and the sharified model runs forward and backward for real (224 px, the
    # model's fixed size).
    result = check_model("timm", "vit_tiny_patch16_224", input_px=64)
    assert (result.outcome, result.reason_kind) == ("nothing-to-share", LINEAR)
    assert "preset='minivit' shares them" in result.reason
    assert (result.minivit_outcome, result.minivit_reason_kind, result.minivit_reason) == ("shared", "", "")
    per_run = (192 * 576 + 576) + (192 * 192 + 192) + (192 * 768 + 768) + (768 * 192 + 192)  # one block's Linears
    assert result.params_before == 5_717_416
    assert result.minivit_params_after == result.params_before - 6 * per_run == 3_052_840  # MiniViT's 3.0 M
    assert (result.minivit_groups, result.minivit_members) == (24, 48)
    assert result.minivit_reduction == pytest.approx(6 * per_run / 5_717_416)
    assert result.minivit_real_check == "passed"
    # The refusal's hint was audited with the very plan of the MiniViT pass.
    assert "preset='minivit' (suggested): 24 groups, -46.6%" in result.alternative and not result.misleading_hint


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Untraceable(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.abs().sum() > 0)):  # data-dependent control flow: torch.fx cannot trace it
            x = self.inner(x)
        return x


def test_refusal_kinds_of_models_without_convs() -> None:
    # No Conv2d or Linear at all: its own kind; residual Linear (MLP) blocks on tokens (N, L, C): the linear-only
    # kind, whose suggestion shares; Linear layers without residual additions: no residual blocks.
    def refusal(model: nn.Module) -> str:
        with pytest.raises(sharify.NothingToShareError) as info:
            sharify.sharify(model, example_inputs=torch.randn(1, 4, 8))
        return _kind_of(info.value)

    assert refusal(nn.Sequential(nn.ReLU(), nn.Flatten())) == NO_CONV_OR_LINEAR
    mlp = nn.Sequential(*(_Mlp() for _ in range(4)))
    assert refusal(mlp) == LINEAR
    minivit = sharify.plan(mlp, preset="minivit", example_inputs=torch.randn(1, 4, 8))
    assert [len(g.members) for g in minivit.groups] == [2] * 4  # 2 runs of two blocks x (fc1, fc2)
    assert refusal(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))) == NO_RESIDUAL
    # Blocks inside a submodule torch.fx cannot trace are not seen: not "no residual blocks".
    hidden = nn.Sequential(_Untraceable(nn.Sequential(*(_Mlp() for _ in range(4)))), nn.Linear(8, 8))
    assert refusal(hidden) == NO_RESIDUAL_SEEN


# The committed sweep (benchmarks/results/coverage.json) must be what the current code gives: a change to the
# analysis or to a refusal's message that is not followed by a new sweep fails here, on the subset. Only the
# analysis is compared (the real forward/backward check is test_model_outcome's), so the models are checked on
# the meta device alone.
_ANALYSIS_FIELDS = ("outcome", "reason_kind", "reason", "build", "traced", "input_shape", "blocks", "stages", "groups",
                    "members", "params_before", "params_after", "alternative", "misleading_hint", "minivit_outcome",
                    "minivit_reason_kind", "minivit_reason", "minivit_groups", "minivit_members",
                    "minivit_params_after")  # fmt: skip


@pytest.fixture(scope="module")
def committed_sweep() -> dict[str, dict[str, object]]:
    data = json.loads((ROOT / "benchmarks/results/coverage.json").read_text())
    return {f"{r.get('source', r['library'])}:{r['name']}": r for r in data["models"]}


@pytest.mark.results
@pytest.mark.parametrize(("source", "name"), [s[:2] for s in SUBSET], ids=[f"{src}:{n}" for src, n, _ in SUBSET])
def test_committed_sweep_is_what_the_code_gives(
    source: str, name: str, committed_sweep: dict[str, dict[str, object]]
) -> None:
    result = check_model(source, name, forward_max_params=0, input_px=64)
    committed = committed_sweep[f"{source}:{name}"]
    stale = {
        k: (committed.get(k), v) for k, v in result.to_dict().items() if k in _ANALYSIS_FIELDS and committed.get(k) != v
    }
    assert not stale, f"benchmarks/results/coverage.json is stale (committed, now): {stale}; rerun benchmarks.coverage"


@pytest.mark.results
def test_readme_minivit_table_is_the_committed_sweep(committed_sweep: dict[str, dict[str, object]]) -> None:
    # The README's per-family table of the MiniViT pass ("Which models it works on") is the committed sweep's.
    section = (ROOT / "README.md").read_text().split("## Which models it works on", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| transformer / MLP family |"))
    rows = lines[start + 2 : next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i])]
    readme = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    # coverage.md's rows: family, models, shared (defaults), refused as linear only, shared (minivit), mean and
    # max reduction (minivit), real checks passed (minivit), errors; the README leaves out the linear-only
    # refusals and the real checks, and writes "%" with a space.
    expected = []
    for row in transformer_family_rows(list(committed_sweep.values()))[2:]:
        family, models, shared, _, minivit, mean, best, _, errors = (c.strip() for c in row.strip("|").split("|"))
        expected.append([family, models, shared, minivit, mean.replace("%", " %"), best.replace("%", " %"), errors])
    assert readme == expected


def test_list_models_filters_with_globs() -> None:
    models = list_models("tv:resnet1*,timm:resnet18d,dpn4*")
    assert models == [("torchvision", "resnet101"), ("torchvision", "resnet152"), ("torchvision", "resnet18"),
                      ("timm", "dpn48b"), ("timm", "resnet18d")]  # fmt: skip
    assert len(list_models("*", limit=3)) == 3


def test_sweep_records_timeouts_and_writes_results(tmp_path: Path) -> None:
    # A worker that exceeds the timeout is killed and replaced; the model is an `error`, the sweep goes on.
    timed_out = run_sweep([("timm", "test_resnet")], jobs=1, timeout=0.5, progress=False)
    assert [(r["outcome"], r["reason_kind"]) for r in timed_out] == [("error", "Timeout")]
    models = [("timm", "test_resnet"), ("timm", "test_efficientnet"), ("timm", "resnet18")]
    results = run_sweep(models, jobs=2, timeout=300, progress=False, input_px=64)
    assert [(r["name"], r["outcome"]) for r in results] == [
        ("test_resnet", "nothing-to-share"), ("test_efficientnet", "nothing-to-share"), ("resnet18", "shared")
    ]  # fmt: skip
    write_results(results + timed_out, tmp_path, {"command": "test", "wall_seconds": 1.0})
    summary = (tmp_path / "coverage.md").read_text()
    assert "1 of 4 timm models shared, 1 error" in summary
    assert (tmp_path / "coverage.csv").read_text().count("\n") == 5


def test_main_writes_results_with_wall_time_and_exits_nonzero_on_errors(tmp_path: Path) -> None:
    argv = ["--filter", "timm:test_resnet", "--out", str(tmp_path), "--no-progress", "--input-px", "32"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "coverage.json").read_text())
    meta = data["meta"]
    assert meta["command"].endswith("python -m benchmarks.coverage " + shlex.join(argv))
    assert meta["wall_seconds"] > 0 and (meta["forward_max_params"], meta["input_px"]) == (60_000_000, 32)
    assert all(meta[k] for k in ("cpus", "machine", "python", "torch", "torchvision", "timm", "date"))
    [model] = data["models"]
    assert list(model) == ModelResult.columns()
    assert {k: model[k] for k in ("library", "name", "family", "outcome", "reason_kind", "build", "traced")} == {
        "library": "timm", "name": "test_resnet", "family": "timm.resnet", "outcome": "nothing-to-share",
        "reason_kind": "no multi-block stage", "build": "meta", "traced": "yes",
    }  # fmt: skip
    assert (model["input_shape"], model["blocks"], model["params_before"]) == ("1x3x160x160", 4, 469_688)
    assert model["params_after"] == model["params_before"] and 0 < model["seconds"] <= meta["wall_seconds"]
    with open(tmp_path / "coverage.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["outcome"]) for r in rows] == [("test_resnet", "nothing-to-share")]
    summary = (tmp_path / "coverage.md").read_text()
    assert "**0 of 1 timm models shared, 0 errors.**" in summary
    assert f"- Wall time: {meta['wall_seconds']:.0f} s" in summary
    # Any `error` outcome (here: a timeout) makes the exit status 1.
    assert main([*argv[:2], "--out", str(tmp_path / "timeout"), "--no-progress", "--timeout", "0.5"]) == 1
    [timed_out] = json.loads((tmp_path / "timeout" / "coverage.json").read_text())["models"]
    assert (timed_out["outcome"], timed_out["reason_kind"]) == ("error", "Timeout")


def test_sources_are_listed_named_and_validated() -> None:
    flow = list_models(sources=["torchvision-optical-flow"])
    assert flow == [("torchvision-optical-flow", "raft_large"), ("torchvision-optical-flow", "raft_small")]
    # Prefixed globs pick sources; the result is in source order whatever the order of the globs.
    assert list_models("hf:resnet,tv-video:r3d*,torchvision-detection:fcos*") == [
        ("torchvision-detection", "fcos_resnet50_fpn"), ("torchvision-video", "r3d_18"), ("transformers", "resnet")
    ]  # fmt: skip
    assert parse_sources("transformers, torchvision-detection") == ["torchvision-detection", "transformers"]
    assert parse_sources("all")[:2] == ["torchvision", "timm"] and len(parse_sources("all")) == 7
    with pytest.raises(ValueError, match=r"unknown source.*'detection'.*choose from all, torchvision, timm"):
        parse_sources("detection")
    assert family_of("torchvision-detection", "maskrcnn_resnet50_fpn") == "torchvision.detection.mask_rcnn"
    assert family_of("transformers", "data2vec-vision") == "transformers.data2vec-vision"


def _row(source: str, name: str, outcome: str = "shared", **extra: object) -> dict[str, object]:
    library = source.split("-")[0]
    row = {c: getattr(ModelResult, c, "") for c in ModelResult.columns()}
    return {**row, "source": source, "library": library, "name": name, "family": f"{library}.x", "variant": name,
            "outcome": outcome, **extra}  # fmt: skip


def test_merge_replaces_rows_of_rerun_models_and_whole_sources() -> None:
    old = [
        _row("timm", "a"),
        _row("torchvision-video", "gone"),
        _row("torchvision-video", "v"),
        _row("torchvision", "t"),
    ]
    del old[0]["source"]  # rows written before sources existed: the library is the source
    new = [_row("transformers", "h", "error"), _row("torchvision-video", "v", "nothing-to-share")]
    merged = merge_results(old, new)
    assert [(r["source"], r["name"], r["outcome"]) for r in merged] == [
        ("torchvision", "t", "shared"), ("timm", "a", "shared"), ("torchvision-video", "gone", "shared"),
        ("torchvision-video", "v", "nothing-to-share"), ("transformers", "h", "error"),
    ]  # fmt: skip
    assert all(list(r) == ModelResult.columns() for r in merged)
    # A source run whole replaces all its rows: a model that is gone from the zoo goes from the results.
    whole = merge_results(old, new, ["torchvision-video", "transformers"])
    assert [r["name"] for r in whole] == ["t", "a", "v", "h"]


def test_main_merges_a_source_into_earlier_results(tmp_path: Path) -> None:
    assert main(["--filter", "timm:test_resnet", "--out", str(tmp_path), "--no-progress", "--input-px", "32"]) == 0
    argv = ["--sources", "torchvision-video", "--filter", "r3d_18", "--merge", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "coverage.json").read_text())
    assert [(r["source"], r["name"]) for r in data["models"]] == [
        ("timm", "test_resnet"),
        ("torchvision-video", "r3d_18"),
    ]
    assert data["meta"]["sources"] == parse_sources("all")  # the base run's
    [run] = data["meta"]["merged_runs"]
    assert (
        run["sources"] == ["torchvision-video"]
        and run["models"] == {"torchvision-video": 1}
        and run["command"].endswith(shlex.join(argv))
    )
    summary = (tmp_path / "coverage.md").read_text()
    assert "**0 of 1 timm models shared, 0 of 1 torchvision-video models shared, 0 errors.**" in summary
    assert "- Merged (rows from this run: torchvision-video 1): `" in summary
    # r3d_18: Conv3d blocks, which sharify does not analyse, and a Linear head: traced, no residual blocks.
    assert "| torchvision-video | 1 | 0 | 1 | 0 | 0 | - | - | 0 | 0 | - | no residual blocks (1) |" in summary
    # A source run whole replaces its rows and the earlier runs of only that source.
    flow = ["--sources", "torchvision-optical-flow", "--merge", "--out", str(tmp_path), "--no-progress"]
    flow += ["--forward-max-params", "0"]  # merging is tested here, not RAFT's real forward
    assert main(flow) == 0 and main(flow) == 0
    data = json.loads((tmp_path / "coverage.json").read_text())
    assert [r["name"] for r in data["models"]] == ["test_resnet", "r3d_18", "raft_large", "raft_small"]
    assert [r["sources"] for r in data["meta"]["merged_runs"]] == [["torchvision-video"], ["torchvision-optical-flow"]]
    with pytest.raises(SystemExit):  # nothing to merge into
        main([*argv[:-3], "--out", str(tmp_path / "empty"), "--no-progress"])
    with pytest.raises(SystemExit):
        main(["--sources", "video", "--out", str(tmp_path)])


def test_model_needing_a_missing_package_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(source: str, name: str) -> None:
        raise MissingPackageError("needs a package that is not installed: FooModel requires the foo library")

    monkeypatch.setattr(benchmarks.coverage_check, "build", build)
    result = check_model("transformers", "resnet")
    assert (result.outcome, result.reason_kind) == ("skipped", "missing package")
    assert "requires the foo library" in result.reason
    summary = summary_markdown([result.to_dict(), _row("transformers", "vit", "nothing-to-share")], {})
    assert "**0 of 2 transformers models shared, 1 skipped (missing packages), 0 errors.**" in summary
    assert (
        "- `transformers:resnet`: needs a package that is not installed: FooModel requires the foo library" in summary
    )


def test_detector_real_check_input_trains_the_detector() -> None:
    # What the real check feeds a shared detector (none is shared before issue 14's descent into backbones):
    # two images with a target box each; in training mode the detector returns its losses, all differentiable.
    torch.manual_seed(0)
    model = build("torchvision-detection", "fasterrcnn_mobilenet_v3_large_320_fpn").train()
    [(images, targets)] = _real_inputs("torchvision-detection", model, None, 64)  # type: ignore[arg-type]
    assert [tuple(x.shape) for x in images] == [(3, 64, 64)] * 2 and [len(t["boxes"]) for t in targets] == [1, 1]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(v.shape == () and torch.isfinite(v) and v.requires_grad for v in losses.values())


def _vit(name: str, reduction: float, family: str = "timm.vision_transformer", **extra: object) -> dict[str, object]:
    """A row refused by the defaults as linear-only and shared by the MiniViT pass with ``reduction``."""
    minivit = {"minivit_outcome": "shared", "minivit_reduction": reduction, "minivit_real_check": "passed"}
    return {**_row("timm", name, "nothing-to-share", family=family, reason_kind=LINEAR), **minivit, **extra}


def test_transformer_family_table_counts_both_passes() -> None:
    refused = "nothing-to-share"
    rows = [
        _vit("vit_tiny_patch16_224", 0.466),
        _vit("vit_small_patch16_224", 0.482, minivit_real_check="skipped: 22M params > 0M"),
        _vit("vit_small_r26_s32_224", 0.30, "timm.vision_transformer_hybrid"),  # a hybrid by its module
        _vit("vit_small_resnet26d_224", 0.20, outcome="shared", reason_kind=""),  # a hybrid by name, conv-shared
        _vit("deit_tiny_patch16_224", 0.466),
        _vit("swinv2_cr_tiny_ns_224", 0.0, minivit_outcome="error", minivit_reason_kind="RuntimeError"),
        _vit("levit_128", 0.25, reason_kind="pointwise only"),  # minivit shares Linear layers beside convs
        _vit("pit_ti_224", 0.45),  # another transformer family
        _row("timm", "resnet18", minivit_outcome=refused),  # not a transformer: in no row
        _row("timm", "poolformer_s12", "nothing-to-share", reason_kind="pointwise only", minivit_outcome=refused),
        _row("torchvision-video", "swin3d_t", "nothing-to-share", reason_kind=LINEAR, minivit_outcome="shared"),
        _vit("vit", 0.495, source="transformers", library="transformers", minivit_real_check="skipped: 86M > 60M"),
        _row("transformers", "resnet", minivit_outcome=refused, minivit_reason_kind="no same-signature convs"),
    ]
    families = [transformer_family(r) for r in rows]
    assert families == [
        "ViT (`vit_*`)", "ViT (`vit_*`)", "hybrids (`vit_*resnet*`, `*hybrid*`)",
        "hybrids (`vit_*resnet*`, `*hybrid*`)", "DeiT (`deit*`)", "Swin (`swin*`)", OTHER_LINEAR,
        OTHER_TRANSFORMERS, None, "PoolFormer (`poolformer*`)", None, None, None,
    ]  # fmt: skip
    # models, shared (defaults), refused as linear only, shared (minivit), mean and max reduction (minivit),
    # real checks passed (minivit), errors (either pass).
    assert transformer_family_rows(rows)[2:] == [
        "| hybrids (`vit_*resnet*`, `*hybrid*`) | 2 | 1 | 1 | 2 | 25.0% | 30.0% | 2 | 0 |",
        "| ViT (`vit_*`) | 2 | 0 | 2 | 2 | 47.4% | 48.2% | 1 | 0 |",
        "| DeiT (`deit*`) | 1 | 0 | 1 | 1 | 46.6% | 46.6% | 1 | 0 |",
        "| Swin (`swin*`) | 1 | 0 | 1 | 0 | - | - | 0 | 1 |",
        "| PoolFormer (`poolformer*`) | 1 | 0 | 0 | 0 | - | - | 0 | 0 |",
        "| other transformers | 1 | 0 | 1 | 1 | 45.0% | 45.0% | 1 | 0 |",
        "| other models with Linear branches | 1 | 0 | 0 | 1 | 25.0% | 25.0% | 1 | 0 |",
        "| transformers (Hugging Face), every model type | 2 | 1 | 1 | 1 | 49.5% | 49.5% | 0 | 0 |",
    ]
    # An error of the MiniViT pass counts in the headline and is listed with the errors.
    assert headline(rows).endswith("1 of 2 transformers models shared, 1 error")
    assert minivit_headline(rows) == (
        "with preset='minivit': 7 of 10 timm models, 1 of 1 torchvision-video models, 1 of 2 transformers models shared"
    )
    summary = summary_markdown(rows, {})
    assert "- `timm:swinv2_cr_tiny_ns_224` (MiniViT pass): RuntimeError: " in summary
    assert "| vit | nothing-to-share: linear only (try preset='minivit') | shared | 49.5% | skipped: 86M" in summary
    assert "| resnet | shared | nothing-to-share: no same-signature convs | - |  |" in summary


@pytest.mark.slow
def test_full_sweep_has_no_errors(tmp_path: Path) -> None:
    # Every source (~1520 models, about 35 minutes with two workers): every model is shared or refused
    # with a library reason. benchmarks/results/coverage.md is this sweep's committed output.
    results = run_sweep(list_models(), jobs=2, timeout=600, progress=False)
    write_results(results, tmp_path, {"command": "pytest -m slow", "wall_seconds": 0.0})
    errors = [
        f"{r['library']}:{r['name']}: {r['reason_kind']}: {r['reason']} | MiniViT pass: {r['minivit_reason']}"
        for r in errors_of(results)
    ]
    assert not errors, "\n".join(errors)
