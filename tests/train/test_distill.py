"""Distillation from the unshared original (``--distill``): the loss, the frozen teacher, exact runs, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import sharify
import sharify.train.state as state_module
from sharify.cli import build_parser, main
from sharify.train import CheckpointError, FinetuneConfig, distillation_loss, finetune, latest_checkpoint, load_data
from sharify.train.cli import config_from_args
from sharify.train.distill import Distiller, stage_paths
from tests.fake_data import make_image_folder
from tests.nets import TinyNet
from tests.train.finetune_utils import EXAMPLE, SMALL_CHANNELS, cli_error, shrink_timm_resnets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, train=8, val=4)


def _pair(norm: str = "bn") -> tuple[nn.Module, nn.Module]:
    """A :class:`TinyNet` (the teacher) and its sharified copy (the student), the same weights every call."""
    torch.manual_seed(0)
    original = TinyNet(norm=norm)
    return original, sharify.sharify(original, example_inputs=EXAMPLE)


def _config(out: Path, **kw: object) -> FinetuneConfig:
    base = {"out": out, "epochs": 2, "batch_size": 4, "workers": 0, "lr": 0.05, "quiet": True, "device": "cpu"}
    return FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]


def _same_state(a: nn.Module | dict[str, torch.Tensor], b: nn.Module | dict[str, torch.Tensor]) -> bool:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "weight"), [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (0.5, 1.0)])
def test_distillation_loss_is_hintons_blend_of_ce_and_t2_scaled_kl(temperature: float, weight: float) -> None:
    student = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])
    teacher = torch.tensor([[3.0, 0.0, -1.0], [-0.5, 1.5, 0.2]])
    labels = torch.tensor([0, 2])
    terms = distillation_loss(student, teacher, labels, temperature=temperature, weight=weight)

    ce = sum(-math.log(math.exp(s[y]) / sum(math.exp(v) for v in s)) for s, y in zip(student.tolist(), [0, 2])) / 2
    kl = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):  # KL(p_teacher || p_student) at temperature T, per image
        zs, zt = (sum(math.exp(v / temperature) for v in row) for row in (s, t))
        for vs, vt in zip(s, t):
            pt, ps = math.exp(vt / temperature) / zt, math.exp(vs / temperature) / zs
            kl += pt * math.log(pt / ps)
    kd = temperature**2 * kl / 2  # the batch mean, scaled by T^2
    assert terms.ce.item() == pytest.approx(ce, rel=1e-6)
    assert terms.kd.item() == pytest.approx(kd, rel=1e-5)
    assert terms.total.item() == pytest.approx((1 - weight) * ce + weight * kd, rel=1e-5)
    same = distillation_loss(teacher, teacher, labels, temperature=temperature, weight=weight)
    assert same.kd.item() == pytest.approx(0.0, abs=1e-7)  # a student that matches its teacher


def test_distillation_loss_passes_gradient_to_the_student_only() -> None:
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    distillation_loss(student, teacher, torch.tensor([0, 1, 2, 3]), label_smoothing=0.1).total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    ls = distillation_loss(student, teacher, torch.tensor([0, 1, 2, 3]), label_smoothing=0.1, weight=0.0)
    expected = F.cross_entropy(student, torch.tensor([0, 1, 2, 3]), label_smoothing=0.1)
    assert torch.equal(ls.total, expected)


# --- the teacher: frozen, untouched, not trained, not saved ------------------------------------------


def test_teacher_is_frozen_untouched_and_outside_optimizer_ema_and_checkpoints(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, student = _pair()
    before = copy.deepcopy(teacher.state_dict())
    optimizers: list[torch.optim.Optimizer] = []
    create = state_module.create_optimizer

    def recording(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizers.append(create(*args, **kwargs))
        return optimizers[-1]

    def check_frozen(epoch: int, update: int) -> None:
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    monkeypatch.setattr(state_module, "create_optimizer", recording)
    cfg = _config(tmp_path, epochs=1, ema_decay=0.9, eval_before=True, distill=True, distill_features=True)
    result = finetune(student, data_dir, cfg, original=teacher, teacher=teacher, on_update=check_frozen)

    assert _same_state(teacher, before)  # bit-identical: BatchNorm statistics included (eval mode)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # as the caller left it
    assert all(p.requires_grad for p in sharify.sharify(teacher, example_inputs=EXAMPLE).parameters())
    trained = {id(p) for group in optimizers[0].param_groups for p in group["params"]}
    assert trained == {id(p) for p in student.parameters()} and not trained & {id(p) for p in teacher.parameters()}
    saved = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))  # type: ignore[operator]
    assert set(saved) == set(student.state_dict()) and set(load_file(str(tmp_path / "model.safetensors"))) == set(saved)
    assert set(result.ema_model.state_dict()) == set(student.state_dict())  # type: ignore[union-attr]
    for model in (teacher, student):  # the stage hooks are gone after the run
        assert not any(m._forward_hooks for m in model.modules())
    first, last = result.metrics
    assert first["teacher_top1"] >= 0 and "teacher_val_loss" in first and "train_kd" not in first
    assert {"train_ce", "train_kd", "train_feat", "images_per_s"} <= set(last)
    assert last["train_loss"] == pytest.approx(0.1 * last["train_ce"] + 0.9 * last["train_kd"] + last["train_feat"])
    assert json.loads((tmp_path / "config.json").read_text())["setup"]["teacher"].startswith("crc32:")


def test_distill_weight_zero_trains_exactly_as_without_distillation(data_dir: Path, tmp_path: Path) -> None:
    plain = finetune(_pair()[1], data_dir, _config(tmp_path / "plain"))
    teacher, student = _pair()
    taught = finetune(student, data_dir, _config(tmp_path / "kd", distill=True, distill_weight=0.0), teacher=teacher)
    assert _same_state(plain.model, taught.model)
    for a, b in zip(plain.metrics, taught.metrics):
        assert all(a[k] == b[k] for k in ("train_loss", "val_loss", "top1", "top5", "updates"))
        assert b["train_ce"] == pytest.approx(b["train_loss"]) and b["train_kd"] > 0  # logged, not trained on


def test_stage_term_is_zero_when_the_student_is_its_teacher() -> None:
    # GroupNorm: the same function in train and eval mode, so a copy of the student computes what it computes
    _, student = _pair(norm="gn")
    assert stage_paths(student) == ["layer1", "layer2"]
    x, labels = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 0])
    config = FinetuneConfig(distill=True, distill_features=True, distill_feature_weight=3.0)
    for teacher, zero in ((copy.deepcopy(student).requires_grad_(False), True), (_pair(norm="gn")[0], False)):
        distiller = Distiller(student, teacher.eval(), config)
        loss, terms = distiller.loss(x, student.train()(x), labels)
        distiller.remove_hooks()
        expected = 0.1 * terms["train_ce"] + 0.9 * terms["train_kd"] + 3 * terms["train_feat"]
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        if zero:
            assert terms["train_feat"].item() == 0 and terms["train_kd"].item() == 0
        else:  # the stage term reaches the stage weights, the shared tensors among them
            assert terms["train_feat"].item() > 0
            student.zero_grad()
            terms["train_feat"].backward()
            assert student.sharify_shared.layer1.conv2.weight.grad.abs().sum() > 0  # type: ignore[union-attr]


class _Stop(KeyboardInterrupt):
    pass


def test_resume_of_a_distilling_run_continues_identically_and_needs_the_same_teacher(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load_data(data_dir)
    kd = {"distill": True, "distill_features": True, "distill_temperature": 2.0, "ema_decay": 0.9}
    teacher, student = _pair()
    full = finetune(student, data, _config(tmp_path / "full", **kd), teacher=teacher)

    def interrupt(epoch: int, update: int) -> None:
        if epoch == 2 and update == 8:  # in the middle of epoch 2 (6 updates per epoch)
            raise _Stop

    teacher, student = _pair()
    with pytest.raises(_Stop):
        finetune(student, data, _config(tmp_path / "cut", **kd), teacher=teacher, on_update=interrupt)
    teacher, student = _pair()  # rebuilt, as sharify finetune --resume rebuilds it
    resumed = finetune(student, data, _config(tmp_path / "cut", resume=True, **kd), teacher=teacher)
    assert _same_state(full.model, resumed.model) and _same_state(full.ema_model, resumed.ema_model)  # type: ignore[arg-type]
    assert [m["train_kd"] for m in resumed.metrics] == [m["train_kd"] for m in full.metrics]

    other_teacher, student = _pair()
    with torch.no_grad():
        other_teacher.fc.bias.add_(1.0)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=r"other settings \(teacher 'crc32:\w+' -> 'crc32:\w+'\)"):
        finetune(student, data, _config(tmp_path / "cut", resume=True, epochs=3, **kd), teacher=other_teacher)
    teacher, student = _pair()
    with pytest.raises(CheckpointError, match=r"distill_weight 0\.9 -> 0\.5"):
        cfg = _config(tmp_path / "cut", resume=True, epochs=3, **{**kd, "distill_weight": 0.5})
        finetune(student, data, cfg, teacher=teacher)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"distill": True, "distill_temperature": 0.0}, "--distill-temperature must be > 0, got 0.0"),
        ({"distill": True, "distill_weight": 1.5}, r"--distill-weight must be in \[0, 1\], got 1.5"),
        ({"distill": True, "distill_weight": float("nan")}, r"--distill-weight must be in \[0, 1\], got nan"),
        ({"distill": True, "distill_features": True, "distill_feature_weight": -1.0}, "--distill-feature-weight must"),
        ({"distill_temperature": 2.0}, "--distill-temperature has no effect without --distill; pass --distill"),
        ({"distill_weight": 0.5}, "--distill-weight has no effect without --distill"),
        ({"distill_features": True}, "--distill-features has no effect without --distill"),
        (
            {"distill": True, "distill_feature_weight": 2.0},
            "--distill-feature-weight has no effect without --distill-f",
        ),
    ],
)
def test_bad_distillation_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**settings).validate()


def test_teachers_that_cannot_teach_are_refused_before_anything_is_written(data_dir: Path, tmp_path: Path) -> None:
    teacher, student = _pair()
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"--distill needs a teacher: finetune\(model, data, teacher=original"):
        finetune(student, data_dir, _config(out, distill=True))
    with pytest.raises(ValueError, match="a teacher is used only with distill=True"):
        finetune(student, data_dir, _config(out), teacher=teacher)
    with pytest.raises(ValueError, match="the teacher shares parameters with the model being trained"):
        finetune(teacher, data_dir, _config(out, distill=True), teacher=teacher)  # the original teaching itself
    with pytest.raises(ValueError, match=r"--distill-features .* the model has no shared groups"):
        finetune(TinyNet(), data_dir, _config(out, distill=True, distill_features=True), teacher=teacher)
    with pytest.raises(ValueError, match="the teacher has no module `layer1`"):
        finetune(student, data_dir, _config(out, distill=True, distill_features=True), teacher=nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"the teacher outputs shape \(4, 5\), the model \(4, 3\)"):
        finetune(student, data_dir, _config(out, distill=True), teacher=TinyNet(num_classes=5))
    assert not any(p.name == "checkpoints" for p in out.glob("*"))


# --- the command line -------------------------------------------------------------------------------


def _cli(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", "timm:resnet18", "--data", str(data_dir), "--out", str(out), "--workers", "0",
            "--batch-size", "6", "--epochs", "1", "--quiet", *extra]  # fmt: skip


def test_cli_parses_the_distillation_flags(tmp_path: Path) -> None:
    parser = build_parser()
    flags = ["--distill", "--distill-temperature", "2", "--distill-weight", "0.5", "--distill-features"]
    config = config_from_args(parser.parse_args(_cli(tmp_path, tmp_path, *flags, "--distill-feature-weight", "3")))
    assert (config.distill, config.distill_temperature, config.distill_weight) == (True, 2.0, 0.5)
    assert (config.distill_features, config.distill_feature_weight) == (True, 3.0)
    default = config_from_args(parser.parse_args(_cli(tmp_path, tmp_path, "--distill")))
    assert (default.distill_temperature, default.distill_weight, default.distill_features) == (4.0, 0.9, False)
    assert not config_from_args(parser.parse_args(_cli(tmp_path, tmp_path))).distill
    assert not FinetuneConfig.RESUME_MAY_CHANGE & {"distill", "distill_temperature", "distill_weight"}


@pytest.fixture
def r18_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shrink_timm_resnets(monkeypatch)
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=3, channels=SMALL_CHANNELS).state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--distill", "--no-sharify"], "with --no-sharify the model trained is the original itself; drop --distill"),
        (["--distill-temperature", "4"], "--distill-temperature has no effect without --distill"),
        (["--distill-weight", "0.9"], "--distill-weight has no effect without --distill"),
        (["--distill", "--distill-feature-weight", "1"], "--distill-feature-weight has no effect without --distill-f"),
        (["--distill", "--distill-weight", "2"], "--distill-weight must be in [0, 1], got 2.0"),
    ],
)
def test_cli_refuses_distillation_that_would_not_work(
    extra: list[str], message: str, data_dir: Path, r18_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = r18_checkpoint.parent / "o"
    assert message in cli_error(_cli(data_dir, out, "--checkpoint", str(r18_checkpoint), *extra), capsys)
    assert not out.exists()


def test_cli_distill_needs_a_trained_original_with_the_datas_classes(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    err = cli_error(_cli(data_dir, tmp_path / "o", "--distill"), capsys)
    assert "without --checkpoint or --pretrained has random weights" in err
    shrink_timm_resnets(monkeypatch)
    ckpt = tmp_path / "r18-5.pth"
    torch.save(timm.create_model("resnet18", num_classes=5, channels=SMALL_CHANNELS).state_dict(), ckpt)
    args = _cli(data_dir, tmp_path / "o", "--checkpoint", str(ckpt), "--distill")
    err = cli_error(args, capsys)  # the data has 3 classes: the 5-class head is replaced by a random one
    assert (
        "the original's classifier was replaced for 3 classes" in err and "--distill-weight 0 --distill-features" in err
    )
    assert not (tmp_path / "o").exists()


def test_cli_distills_from_the_checkpoint_and_resumes(data_dir: Path, r18_checkpoint: Path) -> None:
    out = r18_checkpoint.parent / "run"
    args = _cli(data_dir, out, "--checkpoint", str(r18_checkpoint), "--subset", "6", "--distill", "--distill-features")
    assert main([*args, "--eval-before", "--num-classes", "3"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["teacher_top1"] >= 0 and {"train_ce", "train_kd", "train_feat"} <= set(metrics[1])
    config = json.loads((out / "config.json").read_text())
    assert config["distill"] and config["distill_features"] and config["distill_weight"] == 0.9
    # the same command continues with the teacher rebuilt from the checkpoint (same CRC-32 as the first time)
    assert main([*args, "--eval-before", "--num-classes", "3", "--resume", "--epochs", "2"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
