"""``sharify report``: the JSON of a timm model equals ``sharify.plan``; a reader that goes away early."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm

import sharify
from sharify.cli import main
from tests.conftest import ROOT


def test_report_timm_resnet50d_json_equals_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "timm:resnet50d", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    p = sharify.plan(timm.create_model("resnet50d"))
    assert data["source"] == {"library": "timm", "name": "resnet50d"}
    assert (data["params_before"], data["params_after"], data["saved"]) == (
        p.params_before,
        p.params_after,
        p.params_saved,
    )
    assert data["reduction"] == p.reduction == p.params_saved / p.params_before
    fields = ("key", "stage", "position", "members", "size", "saved")
    assert [{k: g[k] for k in fields} for g in data["groups"]] == [
        dict(zip(fields, (g.key, g.stage, g.position, list(g.members), g.size, g.params_saved), strict=True))
        for g in p.groups
    ]
    # by hand: resnet50d's deep stem and average-pool shortcuts hold no stride-1 3x3 branch conv, so it
    # saves what ResNet-50 saves: (3-1) * 64*64*9 + (4-1) * 128*128*9 + (6-1) * 256*256*9 + (3-1) * 512*512*9
    assert [len(g["members"]) for g in data["groups"]] == [3, 3, 5, 2]
    assert p.params_saved == 5_087_232 and p.params_before == 25_576_264


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_report_into_a_closed_pipe_exits_quietly(unbuffered: bool) -> None:
    """`sharify report resnet50 | head -1` when head has gone before the report is written: no traceback.

    The read end is closed before the child prints (it builds and sharifies the model first), so its
    write fails with EPIPE every time, whether stdout is unbuffered (the error surfaces in ``print``) or
    buffered (it surfaces when stdout is flushed at exit). Exit status 1, as the Python docs' recipe for
    SIGPIPE gives.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "sharify", "report", "resnet18"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert err == ""
    assert proc.returncode == 1


def test_report_takes_torchvision_detectors_without_downloading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch import hub

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted (a pretrained backbone?)")

    monkeypatch.setattr(hub, "load_state_dict_from_url", no_download)
    assert main(["report", "fasterrcnn_resnet50_fpn", "--json"]) == 0  # its backbone's stages are shared
    got = json.loads(capsys.readouterr().out)
    assert got["params_after"] < got["params_before"]
    model, source = sharify.io.zoo.build_model("fasterrcnn_resnet50_fpn")
    assert source.kwargs["weights_backbone"] is None and type(model).__name__ == "FasterRCNN"
    # fine-tuning trains classifiers: a detector is refused with one line, not a crash in the loop
    assert main(["finetune", "--model", "fasterrcnn_resnet50_fpn", "--data", "fashion-mnist", "--out", "x"]) == 2
    assert "not an image classifier" in capsys.readouterr().err


def test_unknown_model_name_lists_all_torchvision_tasks() -> None:
    with pytest.raises(ValueError, match=r"not a torchvision model \(classification, detection, .*did you mean"):
        sharify.io.zoo.resolve_model_name("fasterrcnn_resnet51_fpn")


def test_report_with_a_parameter_budget_shows_the_chosen_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "tv:resnet18", "--param-budget", "0.8", "--init", "scaled", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params_after"] <= 0.8 * data["params_before"]
    ranks = {g["key"]: g["delta_rank"] for g in data["groups"]}
    assert set(ranks) == {"layer1.conv2", "layer2.conv2", "layer3.conv2", "layer4.conv2"} and any(ranks.values())
    for g in data["groups"]:
        assert (g["delta_captured"] is None) == (g["delta_rank"] == 0)
        assert all(0 <= c <= 1 for c in g["delta_captured"] or ())
    # below full sharing: the smallest possible budget is named, exit status 2 with the message on stderr
    assert main(["report", "tv:resnet18", "--param-budget", "0.5"]) != 0
    assert "smallest possible budget here is 0.732" in capsys.readouterr().err
