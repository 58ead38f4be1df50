"""Coverage of the model zoos, on a representative subset (the full sweep is benchmarks/coverage.py).

Each model is checked by :func:`benchmarks.coverage_check.check_model`: built on the meta device, planned
and sharified (report arithmetic == plan arithmetic); shared models up to 30 M parameters are also built
for real, sharified, and run forward/backward on a 64-px input with the output shapes compared to the
original's and gradients required on every shared weight. The expected outcome of each model is part of
the test: a model that stops being shared, or starts being refused for another reason, fails it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.coverage import list_models, run_sweep, write_results
from benchmarks.coverage_check import check_model

SHARED = "shared"
DEPTHWISE = "depthwise only"
NO_RESIDUAL = "no residual blocks"
ONE_BLOCK_STAGES = "no multi-block stage"
NO_SAME_SIGNATURE = "no same-signature convs"
POINTWISE = "pointwise only"

# (library, model, expected outcome: "shared" or the kind of nothing-to-share reason)
SUBSET = [
    ("torchvision", "resnet18", SHARED),
    ("torchvision", "resnext50_32x4d", SHARED),
    ("torchvision", "regnet_y_400mf", SHARED),
    ("torchvision", "efficientnet_v2_s", SHARED),  # FusedMBConv: dense 3x3 convs in the early stages
    ("torchvision", "mobilenet_v3_small", DEPTHWISE),
    ("torchvision", "densenet121", NO_RESIDUAL),
    ("torchvision", "vgg11", NO_RESIDUAL),
    ("torchvision", "swin_t", NO_RESIDUAL),
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
    ("timm", "vit_tiny_patch16_224", NO_RESIDUAL),
]

FORWARD_MAX_PARAMS = 30_000_000


@pytest.mark.parametrize(("library", "name", "expected"), SUBSET, ids=[f"{lib}:{n}" for lib, n, _ in SUBSET])
def test_model_outcome(library: str, name: str, expected: str) -> None:
    result = check_model(library, name, forward_max_params=FORWARD_MAX_PARAMS, input_px=64)
    assert result.outcome != "error", f"{result.reason_kind}: {result.reason}"
    assert result.build.startswith("meta")
    if expected == SHARED:
        assert result.outcome == "shared", result.reason
        assert result.groups >= 1 and result.members >= 2 * result.groups
        assert result.params_after < result.params_before
        if result.params_before <= FORWARD_MAX_PARAMS:
            assert result.real_check == "passed"  # output shapes and shared-weight gradients checked inside
        else:
            assert result.real_check.startswith("skipped")
    else:
        assert (result.outcome, result.reason_kind) == ("nothing-to-share", expected), result.reason
        assert result.params_after == result.params_before and result.reason
        # The refusal's suggestion works: the option it names shares something.
        hint = {DEPTHWISE: "depthwise=True: ", POINTWISE: "positions='last': "}.get(expected)
        if hint is not None:
            assert hint in result.alternative and f"{hint}nothing" not in result.alternative, result.alternative


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


@pytest.mark.slow
def test_full_sweep_has_no_errors(tmp_path: Path) -> None:
    # The whole zoo (~1450 models, about half an hour with two workers): every model is shared or refused
    # with a library reason. benchmarks/results/coverage.md is this sweep's committed output.
    results = run_sweep(list_models(), jobs=2, timeout=600, progress=False)
    write_results(results, tmp_path, {"command": "pytest -m slow", "wall_seconds": 0.0})
    errors = [
        f"{r['library']}:{r['name']}: {r['reason_kind']}: {r['reason']}" for r in results if r["outcome"] == "error"
    ]
    assert not errors, "\n".join(errors)
