"""``sharify finetune`` and :func:`sharify.train.finetune`: smoke run, exact resume, final weights, bad input."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

import sharify
from sharify.cli import main
from sharify.train import CheckpointError, DataError, FinetuneConfig, finetune, latest_checkpoint, load_data
from tests.fake_data import make_image_folder
from tests.nets import TinyNet
from tests.train.finetune_utils import EXAMPLE, SMALL_CHANNELS, cli_error, shrink_timm_resnets, tiny_shared

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, train=8, val=4)


def _config(out: Path, **kw: object) -> FinetuneConfig:
    base = {
        "out": out,
        "epochs": 2,
        "batch_size": 4,
        "workers": 0,
        "lr": 0.05,
        "warmup_epochs": 0.5,
        "ema_decay": 0.9,
        "quiet": True,
        "device": "cpu",
    }
    return FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]


class _Stop(KeyboardInterrupt):
    pass


def test_resume_after_interruption_reproduces_the_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    data = load_data(data_dir)
    # one worker process: its augmentation seeds must also follow (seed, epoch) for the resume to be exact
    full = finetune(tiny_shared(), data, _config(tmp_path / "full", workers=1))

    def interrupt(epoch: int, update: int) -> None:
        if epoch == 2 and update == 8:  # in the middle of epoch 2 (6 updates per epoch)
            raise _Stop

    with pytest.raises(_Stop):
        finetune(tiny_shared(), data, _config(tmp_path / "cut", workers=1), on_update=interrupt)
    assert latest_checkpoint(tmp_path / "cut").name == "epoch-0001"  # the last complete epoch survived
    with pytest.raises(ValueError, match="--resume"):
        finetune(tiny_shared(), data, _config(tmp_path / "cut"))  # never overwrites a run by accident
    resumed = finetune(tiny_shared(), data, _config(tmp_path / "cut", workers=1, resume=True))

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    ea, eb = full.ema_model.state_dict(), resumed.ema_model.state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    lines = [json.loads(s) for s in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert [m["train_loss"] for m in lines] == [m["train_loss"] for m in full.metrics]
    final = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(final[k], b[k]) for k in b)


def test_final_weights_restore_exactly_into_a_sharified_model(data_dir: Path, tmp_path: Path) -> None:
    original = TinyNet()
    model = sharify.sharify(original, example_inputs=EXAMPLE)
    result = finetune(
        model,
        data_dir,
        _config(tmp_path, epochs=1, ema_decay=None, bn_recalibrate=8, eval_before=True),
        original=original,
    )
    fresh = sharify.sharify(TinyNet(), example_inputs=EXAMPLE)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(fresh.eval()(x), result.model.eval()(x))
    restored = sharify.load(tmp_path / "model.safetensors", TinyNet())  # the recipe re-applies the sharing
    assert torch.equal(restored.eval()(x), result.model.eval()(x))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params_after"] == sum(p.numel() for p in model.parameters()) < report["params_before"]
    assert [m["epoch"] for m in result.metrics] == [0, 1]  # eval_before logs epoch 0
    assert {"top1", "top5", "val_loss", "train_loss", "images_per_s", "params", "epoch_seconds"} <= set(result.final)


def test_cli_checkpoint_of_another_architecture_is_a_clear_error(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    original = timm.create_model("resnet18", num_classes=3, channels=(8, 16, 32, 64))
    ckpt = tmp_path / "original.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}, ckpt)
    args = [
        "finetune",
        "--model",
        "timm:resnet18",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data_dir),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--subset",
        "12",
        "--quiet",
    ]
    # timm's resnet18 at 64 channels does not fit a checkpoint of 8..64 channels: a clear error, exit 2
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(ckpt) in err and "does not fit" in err


def test_cli_finetune_runs_and_writes_its_outputs(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "finetune",
        "--model",
        "timm:resnet18",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--workers",
        "0",
        "--subset",
        "12",
        "--quiet",
        "--layer-decay",
        "0.8",
        "--opt",
        "adamw",
        "--lr",
        "1e-3",
    ]
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} >= {
        "report.json",
        "report.md",
        "metrics.jsonl",
        "model.safetensors",
        "checkpoints",
    }
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["train_images"] == 12 and metrics[0]["val_images"] == 12
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] == metrics[0]["params"] < report["params_before"]
    state = load_file(str(out / "model.safetensors"))
    assert "sharify_shared.layer1.conv2.weight" in state and "layer1.1.conv2.weight" not in state


def test_cli_original_checkpoint_and_no_sharify(data_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = timm.create_model("resnet18", num_classes=3)
    torch.save(trained.state_dict(), tmp_path / "original.pth")
    common = ["--model", "timm:resnet18", "--data", str(data_dir), "--epochs", "1", "--batch-size", "6"]
    common += ["--workers", "0", "--subset", "6", "--quiet", "--lr", "1e-9", "--weight-decay", "0"]
    assert (
        main(["finetune", *common, "--checkpoint", str(tmp_path / "original.pth"), "--out", str(tmp_path / "a")]) == 0
    )
    state = load_file(str(tmp_path / "a" / "model.safetensors"))
    members = (trained.layer2[0].conv2.weight + trained.layer2[1].conv2.weight) / 2
    torch.testing.assert_close(state["sharify_shared.layer2.conv2.weight"], members, atol=1e-6, rtol=0)  # lr ~ 0
    assert main(["finetune", *common, "--no-sharify", "--out", str(tmp_path / "b")]) == 0
    plain = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert "layer2.1.conv2.weight" in plain and not any(k.startswith("sharify_shared") for k in plain)
    assert not (tmp_path / "b" / "report.json").exists()


def test_cli_bad_input_gives_one_clear_line(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["finetune", "--model", "timm:resnet18", "--out", str(tmp_path / "o"), "--workers", "0", "--quiet"]
    assert "does not exist" in cli_error([*base, "--data", str(tmp_path / "nope")], capsys)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a data set")
    err = cli_error([*base, "--data", str(a_file)], capsys)
    assert f"data {a_file} is a file, not a directory; pass an ImageFolder directory" in err
    err = cli_error([*base, "--data", str(data_dir), "--out", str(a_file)], capsys)
    assert f"--out {a_file} is a file; pass a directory" in err
    err = cli_error([*base, "--data", str(data_dir), "--out", str(a_file / "run")], capsys)  # its parent is a file
    assert f"cannot create the output directory {a_file / 'run'}" in err and "another --out" in err
    (tmp_path / "flat").mkdir()
    assert "train/<class>" in cli_error([*base, "--data", str(tmp_path / "flat")], capsys)
    assert "--num-classes 3" in cli_error([*base, "--data", str(data_dir), "--num-classes", "5"], capsys)
    bad_model = ["finetune", "--model", "resnet_does_not_exist", "--data", str(data_dir), "--out", str(tmp_path / "o")]
    assert "unknown model" in cli_error(bad_model, capsys)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    assert str(corrupt) in cli_error([*base, "--data", str(data_dir), "--checkpoint", str(corrupt)], capsys)
    assert "--resume" in cli_error([*base, "--data", str(data_dir), "--resume"], capsys)


def test_cli_pretrained_without_internet_is_one_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    import timm.models._hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    def no_hub(*args: object, **kwargs: object) -> None:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached torchvision weights
    monkeypatch.setattr(torch.hub, "urlopen", no_network)  # what torchvision's download calls
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_hub)  # what timm's download calls
    base = ["finetune", "--pretrained", "--data", str(data_dir), "--out", str(tmp_path / "o"), "--quiet"]
    for model in ("tv:resnet18", "timm:resnet18"):
        err = cli_error([*base, "--model", model], capsys)
        assert f"cannot fetch the pretrained weights of {model.replace('tv:', 'torchvision:')}" in err
        assert "needs internet" in err and "--checkpoint PATH" in err
    with pytest.raises(sharify.PretrainedWeightsError, match=r"torchvision:resnet18 \(\[Errno -2\] Name or service"):
        sharify.io.zoo.build_model("tv:resnet18", pretrained=True)
    assert not (tmp_path / "o").exists()


def test_sync_bn_and_amp_need_cuda(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"--sync-bn needs CUDA.*--device cpu"):
        FinetuneConfig(sync_bn=True, device="cpu").validate()
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        finetune(tiny_shared(), data_dir, _config(tmp_path, sync_bn=True))  # nothing trained, nothing written
    assert not tmp_path.joinpath("config.json").exists()
    args = ["finetune", "--model", "timm:resnet18", "--data", str(data_dir), "--out", str(tmp_path / "o")]
    assert "--sync-bn needs CUDA" in cli_error([*args, "--sync-bn", "--device", "cpu"], capsys)
    assert "--amp fp16 needs a CUDA device" in cli_error([*args, "--amp", "fp16", "--device", "cpu"], capsys)


def test_corrupt_or_mismatched_checkpoint_on_resume(data_dir: Path, tmp_path: Path) -> None:
    data = load_data(data_dir)
    finetune(tiny_shared(), data, _config(tmp_path, epochs=1))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    with pytest.raises(CheckpointError, match="does not match the model"):
        torch.manual_seed(0)
        other = sharify.sharify(TinyNet(width=4), example_inputs=EXAMPLE)
        finetune(other, data, _config(tmp_path, epochs=2, resume=True))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=rf"{weights}.*corrupt.*delete"):
        finetune(tiny_shared(), data, _config(tmp_path, epochs=2, resume=True))


def test_class_count_mismatch_is_a_data_error(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--num-classes 3"):
        finetune(sharify.sharify(TinyNet(num_classes=10), example_inputs=EXAMPLE), data_dir, _config(tmp_path))


def test_lambda_r_adds_the_orthogonality_loss(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.nn.Module] = []

    def fake_loss(model: torch.nn.Module) -> torch.Tensor:
        calls.append(model)
        return model.sharify_shared.layer1.conv2.weight.square().sum()

    def basis() -> torch.nn.Module:  # --lambda-r is refused on a model without filter bases
        torch.manual_seed(0)
        return sharify.sharify(TinyNet(), example_inputs=EXAMPLE, method="basis", shared_rank=32, unique_rank=16)

    # the module, not the function sharify.train re-exports under the same name
    monkeypatch.setattr(importlib.import_module("sharify.train.finetune"), "orthogonality_loss", fake_loss)
    cfg = _config(tmp_path / "b", epochs=1, ema_decay=None, augment=False, lambda_r=10.0, weight_decay=0.0)
    shrunk = finetune(basis(), data_dir, cfg).model.sharify_shared.layer1.conv2.weight
    plain = finetune(
        basis(), data_dir, _config(tmp_path / "c", epochs=1, ema_decay=None, augment=False, weight_decay=0.0)
    ).model.sharify_shared.layer1.conv2.weight
    assert len(calls) == 6  # once per micro-batch (24 images / 4)
    assert shrunk.norm() < 0.5 * plain.norm()  # the regulariser's gradient reached the shared tensor


def test_corrupt_image_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, train=4, val=2)
    bad = data / "train" / "class1" / "2.png"
    bad.write_bytes(b"not a png")
    for workers in (0, 1):  # read in this process, and in a DataLoader worker process
        with pytest.raises(DataError, match=rf"^cannot read image {bad} \(.*\); delete or replace the file$"):
            finetune(
                tiny_shared(), data, _config(tmp_path / f"run{workers}", epochs=1, workers=workers, ema_decay=None)
            )
    first = data / "train" / "class0" / "0.png"  # read by load_data for the image size
    first.write_bytes(first.read_bytes()[:20])  # truncated
    base = ["finetune", "--model", "timm:resnet18", "--out", str(tmp_path / "o"), "--workers", "0", "--quiet"]
    assert f"cannot read image {first}" in cli_error([*base, "--data", str(data)], capsys)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    common = ["--epochs", "1", "--batch-size", "6", "--subset", "12", "--workers", "0", "--quiet"]
    return ["finetune", "--data", str(data), "--out", str(out), *common, *extra]


def _metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_passes_the_sharing_options_through(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shrink_timm_resnets(monkeypatch)
    torch.manual_seed(0)
    original = timm.create_model("resnet34", num_classes=3, channels=SMALL_CHANNELS)
    torch.save(original.state_dict(), tmp_path / "r34.pth")
    a = tmp_path / "a"
    sharing = ["--preset", "sharesnet", "--skip-first-block", "--init", "first"]
    frozen = ["--checkpoint", str(tmp_path / "r34.pth"), "--lr", "1e-9", "--weight-decay", "0"]
    assert main(_args(data_dir, a, "--model", "timm:resnet34", *frozen, *sharing)) == 0
    expected = sharify.plan(original, preset="sharesnet", skip_first_block=True, init="first", example_inputs=EXAMPLE)
    report = json.loads((a / "report.json").read_text())
    assert report["params_after"] == expected.params_after == _metrics(a)[0]["params"] < report["params_before"]
    options = sharify.read_recipe(a / "model.safetensors").options
    assert options is not None and options["skip_first_block"] is True and options["init"] == "first"
    state = load_file(str(a / "model.safetensors"))
    # init "first": a shared tensor starts as its group's first member -- block 1, as block 0 is left out
    first_member = original.layer3[1].conv2.weight
    torch.testing.assert_close(state["sharify_shared.layer3.conv2.weight"], first_member, atol=1e-6, rtol=0)

    b = tmp_path / "b"
    basis = ["--method", "basis", "--shared-rank", "8", "--unique-rank", "8", "--lambda-r", "1"]
    assert main(_args(data_dir, b, "--model", "timm:resnet18", *basis)) == 0
    state = load_file(str(b / "model.safetensors"))
    assert {"sharify_shared.layer1.conv2.weight", "layer1.0.conv2.coeff.weight", "layer1.1.conv2.unique.weight"} <= set(
        state
    )
    r18 = timm.create_model("resnet18", num_classes=3, channels=SMALL_CHANNELS)
    expected = sharify.plan(r18, method="basis", shared_rank=8, unique_rank=8, example_inputs=EXAMPLE)
    assert json.loads((b / "report.json").read_text())["params_after"] == expected.params_after
    assert _metrics(b)[0]["params"] == expected.params_after
    # --resume compares the sharing options too
    changed = [*basis[:3], "4", *basis[4:]]
    err = cli_error([*_args(data_dir, b, "--model", "timm:resnet18", *changed), "--resume"], capsys)
    assert "other settings (shared_rank 8 -> 4)" in err


def test_cli_grayscale_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shrink_timm_resnets(monkeypatch)
    data = make_image_folder(tmp_path / "gray", train=4, val=2, gray=True)
    assert main(_args(data, tmp_path / "run", "--model", "timm:resnet18")) == 0
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert state["conv1.weight"].shape[1] == 1  # timm in_chans from the data
    assert _metrics(tmp_path / "run")[0]["train_images"] == 12


def test_cli_torchvision_classifier_head_and_a_module_prefixed_training_checkpoint(
    data_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v3_small(num_classes=5)
    ckpt = tmp_path / "mbv3.pth.tar"
    weights = {f"module.{k}": v for k, v in original.state_dict().items()}  # saved from a DDP-wrapped model
    torch.save({"epoch": 3, "state_dict": weights, "args": argparse.Namespace(model="mobilenet_v3_small")}, ckpt)
    out = tmp_path / "run"
    model = ["--model", "tv:mobilenet_v3_small", "--checkpoint", str(ckpt), "--num-classes", "3", "--depthwise"]
    assert main(_args(data_dir, out, *model, "--lr", "1e-9", "--weight-decay", "0")) == 0
    state = load_file(str(out / "model.safetensors"))
    assert state["classifier.3.weight"].shape == (3, 1024)  # the 5-class head of `classifier` replaced
    stem = original.features[0][0].weight
    torch.testing.assert_close(state["features.0.0.weight"], stem, atol=1e-6, rtol=0)  # the checkpoint loaded
    assert any(k.startswith("sharify_shared.") for k in state)
    restored = sharify.load(out / "model.safetensors")  # the recipe rebuilds the model with the new head
    assert isinstance(restored, torchvision.models.MobileNetV3) and restored.classifier[3].out_features == 3
