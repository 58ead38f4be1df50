"""The training loop and its checkpoints: gradient accumulation, memory format, retention, interruption."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from finetune_utils import TinyNet, make_image_folder, shrink_timm_resnets
from torch import nn

import sharify
import sharify.train.checkpoint as checkpoint_module
from sharify.cli import main
from sharify.train import CheckpointError, FinetuneConfig, finetune, latest_checkpoint, load_checkpoint, load_data
from sharify.train.distributed import DistContext
from sharify.train.loop import Trainer, autocast_context, resolve_amp

EXAMPLE = torch.zeros(1, 3, 12, 12)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, train=4, val=2)  # 12 + 6 images


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return sharify.sharify(TinyNet(), example_inputs=EXAMPLE)


def _config(out: Path, **kw: object) -> FinetuneConfig:
    base = {"out": out, "epochs": 1, "batch_size": 4, "workers": 0, "quiet": True, "device": "cpu", "augment": False}
    return FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]


def _sgd_trainer(model: nn.Module, accum_steps: int, clip_grad: float | None = None, **kw: object) -> Trainer:
    return Trainer(
        model=model,
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        scheduler=None,
        ctx=DistContext(),
        config=FinetuneConfig(accum_steps=accum_steps, clip_grad=clip_grad, quiet=True),
        **kw,  # type: ignore[arg-type]
    )


def test_accumulation_equals_one_big_batch_also_for_a_short_last_group() -> None:
    batches = [(torch.randn(4, 3, 12, 12), torch.randint(0, 3, (4,))) for _ in range(5)]
    start = sharify.sharify(TinyNet(norm="gn"), example_inputs=EXAMPLE)  # no BatchNorm: batch-size independent
    accumulated, big = copy.deepcopy(start), copy.deepcopy(start)
    trainer = _sgd_trainer(accumulated, accum_steps=3)
    trainer.train_epoch(batches, 1, 1)  # updates after micro-batches 3 and 5: groups of 3 and 2
    merged = [tuple(torch.cat(t) for t in zip(*group, strict=True)) for group in (batches[:3], batches[3:])]
    _sgd_trainer(big, accum_steps=1).train_epoch(merged, 1, 1)  # the same two updates, each one batch
    assert trainer.num_updates == 2
    a, b = accumulated.state_dict(), big.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    moved = a["sharify_shared.layer1.conv2.weight"] - start.state_dict()["sharify_shared.layer1.conv2.weight"]
    assert moved.abs().max() > 1e-3


def test_checkpoints_keep_the_newest_and_hold_the_plain_state_as_json(data_dir: Path, tmp_path: Path) -> None:
    result = finetune(_tiny(), data_dir, _config(tmp_path, epochs=3, keep_checkpoints=2, warmup_epochs=1))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0002", "epoch-0003"]  # no .tmp-* leftovers either
    newest = root / "epoch-0003"
    assert sorted(p.name for p in newest.iterdir()) == ["model.safetensors", "state.json", "state.pt"]
    state = json.loads((newest / "state.json").read_text())  # readable without torch
    assert (state["format"], state["epoch"], state["num_updates"]) == (2, 3, 9)  # 3 updates per epoch
    assert state["metrics"] == result.metrics and state["config"]["epochs"] == 3
    assert state["scheduler"]["t_initial"] == 9 - 3 and state["scheduler"]["warmup_t"] == 3
    tensors = torch.load(newest / "state.pt", weights_only=True)
    assert set(tensors) == {"epoch", "optimizer", "rng"}  # nested tensors: optimizer and RNG state
    (newest / "state.json").rename(newest / "meta.json")  # what format 1 checkpoints look like
    assert latest_checkpoint(tmp_path) == newest
    with pytest.raises(CheckpointError, match=r"epoch-0003 has the format of an older sharify.*another --out"):
        finetune(_tiny(), data_dir, _config(tmp_path, epochs=3, keep_checkpoints=2, warmup_epochs=1, resume=True))


def test_resume_refuses_other_settings_and_rebuilds_the_schedule_for_more_epochs(
    data_dir: Path, tmp_path: Path
) -> None:
    run, common = tmp_path / "run", {"warmup_epochs": 0.5, "min_lr": 1e-3}
    full = finetune(_tiny(), data_dir, _config(tmp_path / "full", epochs=3, **common))
    finetune(_tiny(), data_dir, _config(run, epochs=1, **common))
    with pytest.raises(
        CheckpointError, match=r"other settings \(batch_size 4 -> 3, lr 0\.05 -> 0\.1\); resume"
    ) as info:
        finetune(_tiny(), data_dir, _config(run, epochs=3, lr=0.1, batch_size=3, resume=True, **common))
    assert "\n" not in str(info.value) and "epoch-0001" in str(info.value)
    with pytest.raises(CheckpointError, match=r"settings \(train_images 12 -> 6\)"):
        finetune(_tiny(), load_data(data_dir, subset=6), _config(run, resume=True, **common))
    # speed/logging/retention settings may change; the remaining epochs follow a 3-epoch run's schedule
    more = _config(run, epochs=3, resume=True, workers=1, quiet=False, keep_checkpoints=3, **common)
    resumed = finetune(_tiny(), data_dir, more)
    assert [m["epoch"] for m in resumed.metrics] == [1, 2, 3]
    assert resumed.metrics[1]["lr"] == pytest.approx(full.metrics[1]["lr"], rel=1e-9) and full.metrics[1]["lr"] > 0.01
    assert resumed.metrics[2]["lr"] == pytest.approx(full.metrics[2]["lr"], rel=1e-9)
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    with pytest.raises(CheckpointError, match=r"holds epoch 3, beyond --epochs 2; pass --epochs 3 or more"):
        finetune(_tiny(), data_dir, _config(run, epochs=2, resume=True, **common))


def test_ctrl_c_while_saving_a_checkpoint_keeps_the_previous_one(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = checkpoint_module.save_file
    calls = []

    def save_file(*args: object, **kwargs: object) -> None:
        calls.append(args[1])
        if len(calls) == 4:  # epoch 2's ema.safetensors: its model.safetensors is already written
            raise KeyboardInterrupt
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    with pytest.raises(KeyboardInterrupt):
        finetune(_tiny(), data_dir, _config(tmp_path, epochs=2, ema_decay=0.9))
    assert [Path(str(c)).name for c in calls] == ["model.safetensors", "ema.safetensors"] * 2
    assert not list(tmp_path.rglob(".tmp-*"))  # the half-written epoch-0002 is gone
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "epoch-0001"
    ema = _tiny()
    state = load_checkpoint(tmp_path / "checkpoints" / "epoch-0001", _tiny(), ema=ema)
    assert state["epoch"] == 1 and state["num_updates"] == 3
    monkeypatch.setattr(checkpoint_module, "save_file", real)
    resumed = finetune(_tiny(), data_dir, _config(tmp_path, epochs=2, ema_decay=0.9, resume=True))
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]


def test_cli_ctrl_c_exits_130_with_one_line(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shrink_timm_resnets(monkeypatch)

    def save_file(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)  # Ctrl-C while saving epoch 1
    out = tmp_path / "run"
    args = ["finetune", "--model", "timm:resnet18", "--data", str(data_dir), "--out", str(out), "--workers", "0"]
    assert main([*args, "--batch-size", "6", "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    nothing = f"nothing to resume in {out}: rerun the command (without --resume)"
    assert err == f"sharify: interrupted before the first checkpoint; {nothing}"
    assert not list(out.rglob(".tmp-*")) and latest_checkpoint(out) is None


def test_channels_last_training_matches_contiguous_training(data_dir: Path, tmp_path: Path) -> None:
    trained = {}
    for channels_last in (False, True):
        config = _config(tmp_path / str(channels_last), channels_last=channels_last)
        trained[channels_last] = finetune(_tiny(), data_dir, config).model
    model = trained[True]
    assert model.sharify_shared.layer1.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert sharify.verify(model) == []  # the members still read the one shared tensor
    a, b = trained[False].state_dict(), model.state_dict()
    moved = a["sharify_shared.layer1.conv2.weight"] - _tiny().state_dict()["sharify_shared.layer1.conv2.weight"]
    assert moved.abs().max() > 1e-3
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_atomic_write_gives_the_permissions_of_an_ordinary_file(tmp_path: Path) -> None:
    # tempfile.mkstemp creates 0o600 files; a renamed checkpoint must not end up readable by its owner only
    import os

    umask = os.umask(0o022)
    try:
        target = tmp_path / "weights.bin"
        checkpoint_module.atomic_write(target, lambda p: p.write_bytes(b"x"))
        assert target.stat().st_mode & 0o777 == 0o644 and target.read_bytes() == b"x"
        assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
    finally:
        os.umask(umask)


def test_amp_modes_resolve_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # resolution only: no GPU is used
    assert resolve_amp("auto", cpu) == resolve_amp("none", cpu) == "none"
    for mode in ("bf16", "fp16"):
        with pytest.raises(
            ValueError, match=rf"^--amp {mode} needs a CUDA device \(--device cuda\); .*\(--amp none\)$"
        ):
            resolve_amp(mode, cpu)
    with pytest.raises(ValueError, match="unknown --amp 'fp8'; use auto, none, bf16 or fp16"):
        resolve_amp("fp8", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert [resolve_amp(m, cuda) for m in ("auto", "bf16", "fp16", "none")] == ["bf16", "bf16", "fp16", "none"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a V100
    assert resolve_amp("auto", cuda) == "none" and resolve_amp("fp16", cuda) == "fp16"
    with pytest.raises(ValueError, match=r"does not support bfloat16; use --amp fp16"):
        resolve_amp("bf16", cuda)
    # the autocast factory: a no-op for fp32, else autocast to the mode's dtype on the device's type
    assert isinstance(autocast_context("none", cpu)(), type(contextlib.nullcontext()))
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast_context(mode, cpu)():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    # refused before any data is read or model built, as one line
    with pytest.raises(ValueError, match="--amp bf16 needs a CUDA device"):
        FinetuneConfig(amp="bf16", device="cpu").validate()


def _global_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad-scaler"])
def test_clip_grad_rescales_the_gradient_to_the_norm_at_the_step(scaled: bool) -> None:
    batch = [(torch.randn(4, 3, 12, 12), torch.randint(0, 3, (4,)))]
    start = sharify.sharify(TinyNet(norm="gn"), example_inputs=EXAMPLE)
    reference = copy.deepcopy(start)
    nn.functional.cross_entropy(reference(batch[0][0]), batch[0][1]).backward()
    free = _global_grad(reference)
    clip = float(free.norm()) / 10
    model = copy.deepcopy(start)
    # a grad scaler (fp16 AMP) multiplies the loss: the gradient must be unscaled before it is clipped
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
    trainer = _sgd_trainer(model, 1, clip_grad=clip, scaler=scaler)
    seen: list[torch.Tensor] = []
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.append(_global_grad(model)))
    trainer.train_epoch(batch, 1, 1)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], free * (clip / free.norm()), rtol=1e-4, atol=1e-8)  # same direction, norm clip


def test_clip_grad_and_label_smoothing_reach_the_training_loop(data_dir: Path, tmp_path: Path) -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from sharify.train import build_transforms

    def gn() -> nn.Module:
        torch.manual_seed(0)
        return sharify.sharify(TinyNet(norm="gn"), example_inputs=EXAMPLE)  # no BatchNorm: train = eval forward

    norms: list[float] = []

    def record_norm(optimizer: torch.optim.Optimizer, *_: object) -> None:
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.cat(grads).norm()))

    hook = register_optimizer_step_pre_hook(record_norm)  # every optimizer's step, e.g. the one finetune makes
    try:
        # lr ~ 0: the weights stay put, so the training loss is that of the initial model on every batch
        frozen = {"lr": 1e-12, "weight_decay": 0.0}
        plain = finetune(gn(), data_dir, _config(tmp_path / "plain", **frozen))
        free, norms[:] = list(norms), []
        clip = min(free) / 10
        smooth = finetune(gn(), data_dir, _config(tmp_path / "smooth", label_smoothing=0.3, clip_grad=clip, **frozen))
    finally:
        hook.remove()
    assert len(norms) == len(free) == 3 and all(abs(n - clip) < 1e-5 * clip for n in norms)  # --clip-grad
    bundle = load_data(data_dir)
    model = gn()
    _, val_tf, _ = build_transforms(bundle, model, augment=False)
    images = torch.stack([val_tf(bundle.train[i][0]) for i in range(len(bundle.train))])
    labels = torch.tensor([bundle.train[i][1] for i in range(len(bundle.train))])
    with torch.no_grad():
        logits = model(images)
    ce = nn.functional.cross_entropy(logits, labels)
    smoothed = nn.functional.cross_entropy(logits, labels, label_smoothing=0.3)
    assert abs(float(smoothed) - float(ce)) > 1e-3  # (1 - eps) * CE + eps * mean over the classes of -log p
    assert plain.final["train_loss"] == pytest.approx(float(ce), rel=1e-5)
    assert smooth.final["train_loss"] == pytest.approx(float(smoothed), rel=1e-5)
    assert smooth.final["val_loss"] == pytest.approx(plain.final["val_loss"], rel=1e-6)  # validation: plain CE
