"""Plugging sharified models into training code: original checkpoints, timm optimizer/EMA/saver,
activation checkpointing, BatchNorm re-calibration, data sources, and the examples."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

import sharify
from sharify.cli import main
from sharify.train import (
    CheckpointError,
    DataError,
    finetune,
    layer_ids,
    load_data,
    load_weights_file,
    param_groups,
    prepare_model,
    recalibrate_batchnorm,
)
from sharify.train.data import FASHION_MNIST_SYSTEM_DIR, read_idx
from tests.conftest import ROOT, state_equal
from tests.fake_data import fake_fashion_mnist, make_image_folder, write_idx
from tests.nets import TinyNet
from tests.train.finetune_utils import shrink_timm_resnets

EXAMPLES = ROOT / "examples"
EXAMPLE = torch.zeros(1, 3, 12, 12)
pytestmark = pytest.mark.usefixtures("one_thread")


def _small_timm() -> torch.nn.Module:
    return timm.create_model("resnet18", num_classes=3, channels=(8, 16, 32, 64))


def test_original_checkpoint_with_module_prefix_loads_strictly() -> None:
    original = TinyNet()
    shared = sharify.sharify(TinyNet(), example_inputs=EXAMPLE)
    ddp_style = {f"module.{k}": v for k, v in original.state_dict().items()}
    assert not sharify.load_unshared_state_dict(shared, ddp_style).missing_keys
    members = [original.layer1[0].conv2.weight, original.layer1[1].conv2.weight]
    torch.testing.assert_close(shared.sharify_shared.layer1.conv2.weight, (members[0] + members[1]) / 2)
    assert torch.equal(shared.stem.weight, original.stem.weight)
    del ddp_style["module.layer2.1.conv2.weight"]
    with pytest.raises(KeyError, match=r"layer2\.1\.conv2\.weight"):
        sharify.load_unshared_state_dict(shared, ddp_style)


def test_prepare_model_loads_the_original_checkpoint_then_shares(tmp_path: Path) -> None:
    trained = timm.create_model("resnet18", num_classes=3)  # a 3-class checkpoint, built by name below
    torch.save({"model": trained.state_dict()}, tmp_path / "orig.pth")
    net, shared = prepare_model(
        "timm:resnet18",
        checkpoint=tmp_path / "orig.pth",
        num_classes=5,
        sharing={"init": "average"},
        input_size=(32, 32),
    )
    assert torch.equal(net.layer1[0].conv1.weight, trained.layer1[0].conv1.weight)  # original weights loaded
    assert net.fc.out_features == shared.fc.out_features == 5  # then the head replaced
    members = [trained.layer3[0].conv2.weight, trained.layer3[1].conv2.weight]
    torch.testing.assert_close(shared.sharify_shared.layer3.conv2.weight, (members[0] + members[1]) / 2)
    # an in-Python model object works the same way, and is not modified
    own = TinyNet()
    torch.save(TinyNet().state_dict(), tmp_path / "tiny.pth")
    before = {k: v.clone() for k, v in own.state_dict().items()}
    _, tiny = prepare_model(own, checkpoint=tmp_path / "tiny.pth", num_classes=3, input_size=(12, 12))
    assert all(torch.equal(v, own.state_dict()[k]) for k, v in before.items())
    assert sharify.shared_groups(tiny)


def _timm_saver_checkpoint(folder: Path, model: torch.nn.Module) -> tuple[Path, torch.nn.Module]:
    """A checkpoint written by timm's CheckpointSaver as timm's train.py uses it (args, optimizer, EMA, metric)."""
    from timm.utils import CheckpointSaver

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()  # optimizer state with tensors
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # EMA weights that differ from the model's
    args = argparse.Namespace(model="tinynet", lr=0.1, epochs=3, batch_size=4, mean=None, input_size=(3, 12, 12))
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(folder), max_history=1)
    saver.save_checkpoint(0, metric=12.5)
    return folder / "checkpoint-0.pth.tar", ema.module


def test_timm_training_checkpoint_loads_its_state_dict_or_its_ema(tmp_path: Path) -> None:
    trained = TinyNet()
    ckpt, ema = _timm_saver_checkpoint(tmp_path, trained)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(ckpt, weights_only=True)  # what plain weights_only loading makes of timm's checkpoints
    net, shared = prepare_model(TinyNet(), checkpoint=ckpt, num_classes=3, input_size=(12, 12))
    assert state_equal(net, trained) and sharify.shared_groups(shared)  # state_dict, not the EMA weights
    net_ema, _ = prepare_model(TinyNet(), checkpoint=ckpt, checkpoint_ema=True, num_classes=3, input_size=(12, 12))
    assert state_equal(net_ema, ema)
    torch.save(TinyNet().state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"plain\.pth holds no EMA weights.*drop --checkpoint-ema"):
        load_weights_file(tmp_path / "plain.pth", ema=True)


def test_checkpoint_with_other_pickled_objects_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "other.pth.tar"
    torch.save({"state_dict": TinyNet().state_dict(), "ratio": Fraction(1, 3)}, ckpt)
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction.*weights_only=False"):
        load_weights_file(ckpt)  # never unpickled without the caller's consent
    data = make_image_folder(tmp_path / "data", train=2, val=1)
    args = ["finetune", "--model", "timm:resnet18", "--checkpoint", str(ckpt), "--data", str(data)]
    assert main([*args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(ckpt) in err and "torch.save(torch.load(" in err
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(CheckpointError, match=r"corrupt\.pth .*corrupt or not a checkpoint") as info:
        load_weights_file(corrupt)
    assert "\n" not in str(info.value)


def test_ema_moves_the_shared_weight_by_one_step() -> None:
    model = sharify.sharify(TinyNet(), example_inputs=EXAMPLE)
    ema = ModelEmaV3(model, decay=0.9)
    before = ema.module.sharify_shared.layer1.conv2.weight.clone()
    with torch.no_grad():
        model.sharify_shared.layer1.conv2.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * before + 0.1 * model.sharify_shared.layer1.conv2.weight
    torch.testing.assert_close(ema.module.sharify_shared.layer1.conv2.weight, expected)
    assert ema.module.layer1[1].conv2.weight is ema.module.sharify_shared.layer1.conv2.weight  # still shared


@pytest.mark.parametrize("layer_decay", [None, 0.7])
def test_optimizer_sees_each_shared_tensor_once(layer_decay: float | None) -> None:
    model = sharify.sharify(_small_timm(), example_inputs=torch.zeros(1, 3, 32, 32))
    opt = create_optimizer_v2(param_groups(model, weight_decay=0.05, layer_decay=layer_decay), "adamw", lr=1e-3)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    shared = model.sharify_shared.layer1.conv2.weight
    group = next(g for g in opt.param_groups if any(p is shared for p in g["params"]))
    assert group["weight_decay"] == 0.05  # a conv weight: decayed
    if layer_decay is not None:
        first_member = next(g for g in opt.param_groups if any(p is model.layer1[0].conv1.weight for p in g["params"]))
        head = next(g for g in opt.param_groups if any(p is model.fc.weight for p in g["params"]))
        assert group["lr_scale"] == first_member["lr_scale"] < head["lr_scale"] == 1.0


def test_layer_ids_place_shared_tensors_at_their_first_member() -> None:
    timm_model = sharify.sharify(_small_timm(), example_inputs=torch.zeros(1, 3, 32, 32))
    ids = layer_ids(timm_model)
    assert ids["sharify_shared.layer2.conv2.weight"] == ids["layer2.0.conv1.weight"] < ids["layer2.1.conv1.weight"]
    tv = sharify.sharify(torchvision.models.resnet18(num_classes=3))  # no group_matcher: timm's auto grouping
    ids = layer_ids(tv)
    assert ids["sharify_shared.layer1.conv2.weight"] <= ids["layer2.0.conv1.weight"] < ids["fc.weight"]


@pytest.mark.parametrize("reentrant", [True, False])
def test_grad_checkpointing_gives_the_same_gradients(reentrant: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.checkpoint
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    real = torch.utils.checkpoint.checkpoint
    calls: list[bool] = []

    def counting(*args: object, use_reentrant: bool | None = None, **kwargs: object) -> object:
        calls.append(bool(use_reentrant))
        return real(*args, use_reentrant=use_reentrant, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)  # timm calls it through the module
    previous = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        model = sharify.sharify(_small_timm(), example_inputs=torch.zeros(1, 3, 32, 32)).eval()
        forwards = []
        model.layer3[1].register_forward_pre_hook(lambda *_: forwards.append(1))
        x = torch.randn(2, 3, 32, 32)
        model(x).square().sum().backward()
        plain = model.sharify_shared.layer3.conv2.weight.grad.clone()
        assert not calls and len(forwards) == 1
        model.zero_grad()
        model.set_grad_checkpointing(True)
        model(x).square().sum().backward()
        torch.testing.assert_close(model.sharify_shared.layer3.conv2.weight.grad, plain)
        assert calls == [reentrant] * 8  # one checkpoint per residual block, of the requested kind
        assert len(forwards) == 3  # the checkpointed block ran again in the backward pass
    finally:
        set_reentrant_ckpt(previous)


def test_batchnorm_recalibration_uses_a_cumulative_average() -> None:
    model = TinyNet().eval()
    batches = [torch.randn(4, 3, 12, 12) + i for i in range(3)]
    assert recalibrate_batchnorm(model, batches, num_images=12) == 12
    bn = model.layer1[0].n1
    assert bn.momentum == 0.1 and not model.training  # restored
    recalibrated = bn.running_mean.clone()
    acts: list[torch.Tensor] = []
    handle = model.layer1[0].conv1.register_forward_hook(lambda m, i, o: acts.append(o.mean(dim=(0, 2, 3))))
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    torch.testing.assert_close(recalibrated, torch.stack(acts).mean(0), rtol=1e-4, atol=1e-5)


def test_fashion_mnist_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))
    bundle = load_data("fashion-mnist", root=tmp_path, subset=8)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes, bundle.in_chans) == (8, 8, 10, 1)
    image, label = bundle.train[0]
    assert image.size == (28, 28) and image.mode == "L" and 0 <= label < 10
    broken = tmp_path / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(gzip.compress(gzip.decompress(broken.read_bytes())[:-3]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(broken)


def test_fashion_mnist_is_found_in_the_debian_package_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sharify.train.data as data_module

    system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", system)
    with pytest.raises(DataError, match=f"not found in {system}; install them with `apt-get install"):
        load_data("fashion-mnist")  # not installed: says where it looked and how to install
    fake_fashion_mnist(system)
    bundle = load_data("fashion-mnist", subset=8)  # no root: the package location
    assert bundle.source == str(system) and (bundle.in_chans, bundle.image_size, bundle.num_classes) == (
        1,
        (28, 28),
        10,
    )
    shrink_timm_resnets(monkeypatch)
    out = tmp_path / "run"
    args = ["finetune", "--model", "timm:resnet18", "--data", "fashion-mnist", "--out", str(out), "--quiet"]
    assert main([*args, "--subset", "8", "--batch-size", "4", "--workers", "0"]) == 0, capsys.readouterr().err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["train_images"] == 8 and metrics[0]["val_images"] == 8
    assert load_file(str(out / "model.safetensors"))["conv1.weight"].shape[1] == 1  # grayscale stem from the data
    setup = json.loads((out / "config.json").read_text())["setup"]
    assert (setup["data"], setup["data_source"]) == ("fashion-mnist", str(system))  # what was asked, where it was


def _fake_cifar(root: Path) -> Path:
    """torchvision's CIFAR-10/100 python layout, with 6 random images per file."""
    import pickle

    rng = np.random.default_rng(0)
    layouts = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta", 10),
        ("cifar-100-python", ["train", "test"], "meta", 100),
    )
    for folder, files, meta, classes in layouts:
        (root / folder).mkdir(parents=True)
        labels, names = ("labels", "label_names") if classes == 10 else ("fine_labels", "fine_label_names")
        for name in files:
            batch = {"data": rng.integers(0, 255, (6, 3 * 32 * 32), dtype=np.uint8), labels: [1, 2, 3, 4, 5, 6]}
            (root / folder / name).write_bytes(pickle.dumps(batch))
        (root / folder / meta).write_bytes(pickle.dumps({names: [f"class{i}" for i in range(classes)]}))
    return root


def test_cifar_with_a_local_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import torchvision.datasets.cifar

    from sharify.train import build_transforms
    from sharify.train.data import STATS

    root = _fake_cifar(tmp_path / "cifar")
    # torchvision checks the files' md5 against the real archives'; keep only its "file exists" part
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    for name, classes, train_files in (("cifar10", 10, 5), ("cifar100", 100, 1)):
        bundle = load_data(name, root=root)
        assert (bundle.name, bundle.num_classes, bundle.in_chans, bundle.image_size) == (name, classes, 3, (32, 32))
        assert (len(bundle.train), len(bundle.val)) == (6 * train_files, 6) and bundle.classes[2] == "class2"
        assert (bundle.mean, bundle.std) == STATS[name]
        image, label = bundle.train[0]
        assert image.size == (32, 32) and image.mode == "RGB" and label == 1
        _, val_tf, shape = build_transforms(bundle, TinyNet(num_classes=classes))
        x = val_tf(image)  # native 32 px, normalised with the data set's statistics
        mean, std = torch.tensor(STATS[name][0])[:, None, None], torch.tensor(STATS[name][1])[:, None, None]
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255
        assert shape == (3, 32, 32) and torch.allclose(x, (pixels - mean) / std, atol=1e-6)
    result = finetune(
        sharify.sharify(TinyNet(num_classes=10), example_inputs=torch.zeros(1, 3, 32, 32)),
        load_data("cifar10", root=root, subset=8),
        out=tmp_path / "run",
        batch_size=4,
        workers=0,
        quiet=True,
        device="cpu",
    )
    assert result.final["train_images"] == 8 and result.final["val_images"] == 6


def test_large_images_use_the_models_timm_data_config(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision.transforms import InterpolationMode, Resize

    from sharify.train import build_transforms
    from sharify.train.distributed import DistContext
    from sharify.train.loaders import build_loaders

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i, (h, w) in enumerate([(72, 96), (90, 80), (96, 96)]):  # larger than 64 px, mixed sizes
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / f"c{c}" / f"{i}.png")
    bundle = load_data(tmp_path)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.4, 0.25)
    overlay = {"input_size": (3, 80, 80), "mean": mean, "std": std, "crop_pct": 1.0, "interpolation": "bilinear"}
    model = timm.create_model(
        "resnet18", num_classes=2, channels=(8, 16, 32, 64), pretrained_cfg_overlay=overlay
    )  # a model whose data config differs from every default
    train_tf, val_tf, shape = build_transforms(bundle, model)
    assert shape == (3, 80, 80)
    resizes = [t for t in val_tf.transforms[-1].transforms if isinstance(t, Resize)]  # type: ignore[attr-defined]
    assert resizes and resizes[0].interpolation == InterpolationMode.BILINEAR
    color = (200, 100, 50)
    x = val_tf(Image.new("RGB", (96, 72), color))
    expected = (torch.tensor(color) / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert x.shape == (3, 80, 80) and torch.allclose(x, expected[:, None, None].expand_as(x), atol=1e-5)
    assert train_tf(bundle.train[0][0]).shape == (3, 80, 80)
    loaders = build_loaders(bundle, model, DistContext(), batch_size=6, workers=0)  # mixed sizes batch together
    images, _ = next(iter(loaders.train))
    assert images.shape == (6, 3, 80, 80) and next(iter(loaders.val))[0].shape == (6, 3, 80, 80)
    # a model without a data config (torchvision): ImageNet defaults at 224 px
    _, val_tf, shape = build_transforms(bundle, torchvision.models.resnet18(num_classes=2))
    x = val_tf(Image.new("RGB", (96, 72), color))
    imagenet = (torch.tensor(color) / 255 - torch.tensor((0.485, 0.456, 0.406))) / torch.tensor((0.229, 0.224, 0.225))
    assert shape == (3, 224, 224) and torch.allclose(x, imagenet[:, None, None].expand_as(x), atol=1e-5)


# .ci/run installs the Debian package, so in CI (CI=true) a missing dataset fails instead of skipping.
@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir() and not os.environ.get("CI"),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_system_package_is_found() -> None:
    bundle = load_data("fashion-mnist", subset=100)
    assert bundle.source == str(FASHION_MNIST_SYSTEM_DIR) and bundle.image_size == (28, 28)
    assert len(bundle.train) == 100 and bundle.classes[9] == "Ankle boot"


def _run_example(name: str, argv: list[str]) -> dict[str, float]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        module = __import__(name)
        return module.main(argv)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_plain_pytorch_example(tmp_path: Path) -> None:
    from PIL import Image

    data = make_image_folder(tmp_path / "data", train=4, val=2)
    # images of other sizes than the first (12 x 12), as in any real ImageFolder: they must still batch
    resized = {path: (20, 16) for path in (data / "train" / "class1").iterdir()}
    resized[data / "val" / "class2" / "0.png"] = (9, 14)
    for path, size in resized.items():
        with Image.open(path) as image:
            image.resize(size).save(path)
    out = tmp_path / "plain.safetensors"
    result = _run_example(
        "plain_pytorch", ["--data", str(data), "--subset", "12", "--batch-size", "6", "--out", str(out)]
    )
    shared = sharify.sharify(torchvision.models.resnet18(num_classes=3), example_inputs=EXAMPLE)
    shared.load_state_dict(load_file(str(out)))
    assert 0 <= result["top1"] <= 100


def test_timm_style_example_with_checkpoint_saver(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", train=4, val=2)
    out = tmp_path / "ckpt"
    _run_example(
        "timm_style",
        [
            "--data",
            str(data),
            "--subset",
            "12",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--grad-checkpointing",
            "non-reentrant",
        ],
    )
    saved = torch.load(out / "model_best.pth.tar", map_location="cpu", weights_only=False)
    model = sharify.sharify(timm.create_model("resnet18", num_classes=3), example_inputs=EXAMPLE)
    model.load_state_dict(saved["state_dict"])  # timm's saver output loads into a sharified model
    ema = sharify.sharify(timm.create_model("resnet18", num_classes=3), example_inputs=EXAMPLE)
    ema.load_state_dict(saved["state_dict_ema"])
    assert "sharify_shared.layer4.conv2.weight" in saved["state_dict"]


def test_named_datasets_without_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"download=True"):
        load_data("cifar10", root=tmp_path)
    with pytest.raises(DataError, match="--data-root"):
        load_data("cifar100")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_data("fashion-mnist", root=tmp_path)


def test_baseline_without_sharing_uses_the_same_model_object() -> None:
    own = TinyNet(num_classes=4)
    net, model = prepare_model(own, num_classes=3, share=False)
    assert net is model and not sharify.shared_groups(model) and model.fc.out_features == 3
