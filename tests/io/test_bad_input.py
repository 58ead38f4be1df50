"""Bad input to loading, saving and reporting: each gets a clear error naming the problem, or the right result.

Covers ``load_unshared_state_dict`` (shapes, keys, training-checkpoint wrappers, nothing half-loaded),
``save`` / ``load`` / ``read_recipe`` (paths that are directories, missing or not files; damaged and
foreign files; a model on the meta device), ``report`` (unrelated models, swapped arguments) and the
argument checks of ``Recipe.from_json`` and ``ModelSource``.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

import sharify
from sharify.io import serialization
from tests.conftest import perturb, state_equal
from tests.nets import OneStageNet, PlainNet

X = torch.zeros(1, 3, 16, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


def _shared(**options: object) -> nn.Module:
    return sharify.sharify(OneStageNet(), example_inputs=X, **options)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


# --- load_unshared_state_dict -------------------------------------------------------------------------------


def test_member_of_the_wrong_shape_is_refused_by_name_and_nothing_loads() -> None:
    shared, sd = _shared(), OneStageNet().state_dict()
    sd["blocks.1.conv2.weight"] = torch.zeros(8, 8, 1, 1)
    before = _snapshot(shared)
    with pytest.raises(ValueError, match=r"blocks\.1\.conv2\.weight has shape \(8, 8, 1, 1\).*'blocks\.conv2'"):
        sharify.load_unshared_state_dict(shared, sd)
    assert _unchanged(shared, before)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda sd: sd.update({"fc.weight": torch.zeros(3, 8)}), ValueError, r"fc\.weight has shape \(3, 8\)"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(1)}), ValueError, r"'extra\.weight'.*strict=False"),
        (lambda sd: sd.pop("fc.bias"), KeyError, r"no 'fc\.bias'"),
    ],
    ids=["non-member shape", "unexpected key", "missing key"],
)
def test_errors_outside_the_groups_leave_the_model_bit_identical(change, error, match) -> None:  # type: ignore[no-untyped-def]
    shared, sd = _shared(), perturb(OneStageNet()).state_dict()
    change(sd)
    before = _snapshot(shared)
    with pytest.raises(error, match=match):
        sharify.load_unshared_state_dict(shared, sd)
    assert _unchanged(shared, before)


def _wrapped(sd: dict[str, torch.Tensor], how: str) -> object:
    return {
        "plain": sd,
        "timm state_dict": {"state_dict": sd, "epoch": 3, "arch": "net"},
        "model": {"model": sd, "optimizer": {"state": {}}},
        "ddp prefix": {f"module.{k}": v for k, v in sd.items()},
        "compile prefix": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "compiled ddp": {f"_orig_mod.module.{k}": v for k, v in sd.items()},
        "wrapped ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "state_dict_ema": sd},
    }[how]


@pytest.mark.parametrize(
    "how", ["plain", "timm state_dict", "model", "ddp prefix", "compile prefix", "compiled ddp", "wrapped ddp"]
)
def test_training_checkpoint_wrappers_and_prefixes_are_recognised(how: str) -> None:
    original = perturb(OneStageNet())
    expected = _shared()
    sharify.load_unshared_state_dict(expected, original.state_dict())
    shared = _shared()
    result = sharify.load_unshared_state_dict(shared, _wrapped(original.state_dict(), how))  # type: ignore[arg-type]
    assert not result.missing_keys and not result.unexpected_keys
    assert state_equal(shared, expected)
    mean = torch.stack([original.blocks[i].conv2.weight for i in range(3)]).mean(0)
    torch.testing.assert_close(shared.sharify_shared.blocks.conv2.weight, mean)


def test_an_ema_only_checkpoint_is_named_in_the_error() -> None:
    shared, sd = _shared(), OneStageNet().state_dict()
    with pytest.raises(ValueError, match=r"'state_dict_ema'.*pass state_dict\['state_dict_ema'\]"):
        sharify.load_unshared_state_dict(shared, {"state_dict_ema": sd, "epoch": 1})
    assert sharify.load_unshared_state_dict(shared, {"state_dict_ema": sd}["state_dict_ema"])  # the fix works


@pytest.mark.parametrize(
    ("arg", "error", "match"),
    [
        ("model.pth", TypeError, r"got str \(a path: pass torch\.load"),
        ([("fc.bias", torch.zeros(4))], TypeError, "mapping of names to tensors, got list"),
        ({"fc.bias": 3}, ValueError, r"'fc\.bias' is of type int, not a tensor"),
    ],
)
def test_state_dict_of_the_wrong_type(arg: object, error: type[Exception], match: str) -> None:
    shared = _shared()
    before = _snapshot(shared)
    with pytest.raises(error, match=match):
        sharify.load_unshared_state_dict(shared, arg)  # type: ignore[arg-type]
    assert _unchanged(shared, before)


def test_a_sharified_state_dict_and_a_non_bool_strict_are_refused() -> None:
    shared = _shared()
    with pytest.raises(ValueError, match=r"sharified model's.*shared\.load_state_dict"):
        sharify.load_unshared_state_dict(shared, _shared().state_dict())
    with pytest.raises(TypeError, match="strict must be True or False"):
        sharify.load_unshared_state_dict(shared, OneStageNet().state_dict(), strict="no")  # type: ignore[arg-type]


def test_strict_false_keeps_the_documented_semantics() -> None:
    shared, original = _shared(), perturb(OneStageNet())
    sd = original.state_dict()
    del sd["blocks.2.conv2.weight"]  # a member missing: the group keeps its tensors
    sd["extra.weight"] = torch.zeros(1)
    group = shared.sharify_shared.blocks.conv2.weight.clone()
    result = sharify.load_unshared_state_dict(shared, sd, strict=False)
    assert result.unexpected_keys == ["extra.weight"]
    assert set(result.missing_keys) == {"sharify_shared.blocks.conv2.weight", "sharify_shared.blocks.conv2.bias"}
    assert torch.equal(shared.sharify_shared.blocks.conv2.weight, group)
    assert torch.equal(shared.fc.weight, original.fc.weight)
    sd["fc.weight"] = torch.zeros(2, 8)  # shapes are checked with strict=False too
    with pytest.raises(ValueError, match=r"fc\.weight has shape"):
        sharify.load_unshared_state_dict(shared, sd, strict=False)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"method": "basis", "shared_rank": 4, "unique_rank": 1}, "method='basis'"),
        ({"init": "scaled"}, "init='scaled'"),
    ],
)
def test_models_whose_shared_tensors_are_not_an_init_are_refused(options: dict[str, object], match: str) -> None:
    shared = _shared(**options)
    before = _snapshot(shared)
    with pytest.raises(ValueError, match=f"{match}.*load the checkpoint into the original model"):
        sharify.load_unshared_state_dict(shared, OneStageNet().state_dict())
    assert _unchanged(shared, before)


def test_a_meta_device_model_is_materialised_quietly_or_refused_untouched() -> None:
    original = perturb(OneStageNet())
    expected = _shared()
    sharify.load_unshared_state_dict(expected, original.state_dict())
    with torch.device("meta"):
        shared = _shared()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "copying ... to a meta parameter ... is a no-op" per tensor
        assert not sharify.load_unshared_state_dict(shared, original.state_dict()).missing_keys
    assert all(t.device.type == "cpu" for t in [*shared.parameters(), *shared.buffers()])
    assert state_equal(shared, expected) and sharify.verify(shared) == []
    with torch.device("meta"):
        skeleton = _shared()
    sd = original.state_dict()
    del sd["fc.bias"]
    with pytest.raises(ValueError, match=r"meta device.*no data for `fc\.bias`; nothing was loaded"):
        sharify.load_unshared_state_dict(skeleton, sd, strict=False)
    assert all(t.is_meta for t in skeleton.parameters())


def test_a_meta_device_model_keeps_its_own_ties() -> None:
    def tied() -> nn.Module:
        net = OneStageNet()
        net.blocks[2].conv1.weight = net.blocks[1].conv1.weight  # tied by hand, as model code does
        return net

    original = perturb(tied())
    with torch.device("meta"):
        shared = sharify.sharify(tied(), example_inputs=torch.zeros(1, 3, 16, 16, device="meta"))
    sharify.load_unshared_state_dict(shared, original.state_dict())
    assert shared.blocks[2].conv1.weight is shared.blocks[1].conv1.weight
    assert not shared.blocks[1].conv1.weight.is_meta
    assert torch.equal(shared.blocks[1].conv1.weight, original.blocks[1].conv1.weight)


# Defined here, not in tests/nets.py: non-tensor extra state is what the next test is about.
class Calibration(nn.Module):
    """A module with non-tensor state (``get_extra_state``), as quantization and export helpers have."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def get_extra_state(self) -> dict[str, float]:
        return {"scale": self.scale}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.scale = state["scale"]


def test_non_tensor_extra_state_loads_as_load_state_dict_does() -> None:
    def net() -> nn.Module:
        model = OneStageNet()
        model.calibration = Calibration()
        return model

    original = net()
    original.calibration.scale = 3.0
    shared = sharify.sharify(net(), example_inputs=X)
    assert not sharify.load_unshared_state_dict(shared, original.state_dict()).missing_keys
    assert shared.calibration.scale == 3.0


def test_finetune_checkpoint_reader_uses_the_same_unwrapping(tmp_path: Path) -> None:
    from sharify.train.model import load_weights_file

    sd = OneStageNet().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "state_dict_ema": sd}, tmp_path / "c.pth")
    assert list(load_weights_file(tmp_path / "c.pth")) == list(sd)
    assert list(load_weights_file(tmp_path / "c.pth", ema=True)) == list(sd)


# --- save -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "error", "match"),
    [
        (lambda d: d, IsADirectoryError, "is a directory; pass a file path such as"),
        (lambda d: d / "missing" / "m.safetensors", FileNotFoundError, r"directory .*missing does not exist"),
        (lambda d: d / "file" / "m.safetensors", NotADirectoryError, r"file is a file, not a directory"),
        (lambda d: d / "file" / "sub" / "m.safetensors", NotADirectoryError, r"file is a file, not a directory"),
    ],
    ids=["directory", "missing parent", "file as parent", "file as grandparent"],
)
def test_save_to_a_place_that_cannot_hold_the_file(tmp_path: Path, where, error, match) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "file").write_text("x")
    path = where(tmp_path)
    with pytest.raises(error, match=match) as info:
        sharify.save(_shared(), path)
    assert isinstance(info.value, OSError) and info.value.filename == str(path)  # the user's path, not a temporary one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_save_does_not_replace_a_special_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(FileExistsError, match="not a regular file"):
        sharify.save(_shared(), tmp_path / "pipe")
    assert not (tmp_path / "pipe").is_file()


def test_a_failed_write_is_an_oserror_naming_the_users_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(
            f'Error while serializing: I/O error: Permission denied (os error 13) at path "{filename}"'
        )

    monkeypatch.setattr(serialization, "save_file", denied)
    path = tmp_path / "m.safetensors"
    with pytest.raises(PermissionError, match=r"cannot write the file \(Permission denied\)") as info:
        sharify.save(_shared(), path)
    assert info.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone

    def other(tensors: object, filename: str, metadata: object = None) -> None:
        raise SafetensorError("Some tensors share memory")

    monkeypatch.setattr(serialization, "save_file", other)
    with pytest.raises(SafetensorError, match="share memory"):  # not an I/O error: passed on as it is
        sharify.save(_shared(), path)


@pytest.mark.parametrize("path", [3, None, ["m.safetensors"]])
def test_save_load_and_read_recipe_want_a_path(path: object) -> None:
    with pytest.raises(TypeError, match=r"save expects a file path \(str or os\.PathLike\)"):
        sharify.save(_shared(), path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="load expects a file path"):
        sharify.load(path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="read_recipe expects a file path"):
        sharify.read_recipe(path)  # type: ignore[arg-type]


# --- load / read_recipe -----------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[nn.Module, Path]:
    shared = perturb(_shared())
    return shared, sharify.save(shared, tmp_path / "m.safetensors")


def _read_both(path: Path) -> list[Exception]:
    errors = []
    for read in (lambda: sharify.read_recipe(path), lambda: sharify.load(path, model=OneStageNet())):
        with pytest.raises(Exception) as info:  # the callers check type and message
            read()
        errors.append(info.value)
    return errors


def test_a_directory_is_said_to_be_a_directory(saved: tuple[nn.Module, Path]) -> None:
    for error in _read_both(saved[1].parent):
        assert isinstance(error, IsADirectoryError)
        assert "is a directory, not a file" in str(error) and "m.safetensors" in str(error)
    for error in _read_both(saved[1].parent / "missing.safetensors"):
        assert isinstance(error, FileNotFoundError) and "no such file" in str(error)


def _damage(path: Path, how: str) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"{how}.safetensors")
    if how == "empty":
        out.write_bytes(b"")
    elif how == "truncated":
        out.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        out.write_bytes(bytes(range(256)) * 4)
    elif how == "torch.save":
        torch.save(OneStageNet().state_dict(), out)
    elif how == "legacy torch.save":
        torch.save(OneStageNet().state_dict(), out, _use_new_zipfile_serialization=False)
    else:
        save_file(OneStageNet().state_dict(), str(out))  # a plain safetensors file
    return out


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("empty", r"it is empty \(0 bytes\)"),
        ("truncated", "truncated, corrupted or of another format"),
        ("garbage", "truncated, corrupted or of another format"),
        ("torch.save", r"torch\.save file.*sharify\.load_unshared_state_dict\(shared, torch\.load"),
        ("legacy torch.save", r"torch\.save file.*sharify\.load_unshared_state_dict"),
        ("no recipe", r"without a sharify recipe.*load_unshared_state_dict"),
    ],
)
def test_damaged_and_foreign_files_name_the_path_and_the_fix(
    saved: tuple[nn.Module, Path], how: str, match: str
) -> None:
    path = _damage(saved[1], how)
    for error in _read_both(path):
        assert isinstance(error, sharify.CheckpointError)
        assert str(path) in str(error)
    with pytest.raises(sharify.CheckpointError, match=match):
        sharify.read_recipe(path)


def test_load_into_a_meta_device_model_materialises_it_quietly(saved: tuple[nn.Module, Path]) -> None:
    shared, path = saved
    with torch.device("meta"):
        skeleton = OneStageNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "copying ... to a meta parameter ... is a no-op" flood
        loaded = sharify.load(path, model=skeleton)
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert state_equal(loaded, shared)
    assert sharify.verify(loaded) == []
    assert all(p.is_meta for p in skeleton.parameters())  # the caller's model is not modified
    shared.eval(), loaded.eval()
    assert torch.equal(loaded(X), shared(X))
    loaded.sharify_shared.blocks.conv2.weight.data.add_(1)  # still one tensor for every member
    assert torch.equal(loaded.blocks[0].conv2.weight, loaded.blocks[2].conv2.weight)


def test_load_into_a_meta_model_the_file_cannot_fill_is_refused(saved: tuple[nn.Module, Path]) -> None:
    with torch.device("meta"):
        skeleton = OneStageNet()
        skeleton.extra = nn.Linear(2, 2)
    with pytest.raises(sharify.CheckpointError, match=r"meta device.*no data for `extra\.weight`"):
        sharify.load(saved[1], model=skeleton, strict=False)


def test_load_into_a_meta_model_keeps_the_models_dtype(saved: tuple[nn.Module, Path]) -> None:
    with torch.device("meta"):
        skeleton = OneStageNet().double()
    loaded = sharify.load(saved[1], model=skeleton)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    torch.testing.assert_close(loaded.fc.weight, saved[0].fc.weight.double())


def test_load_and_save_check_their_other_arguments(saved: tuple[nn.Module, Path]) -> None:
    with pytest.raises(TypeError, match="strict must be True or False"):
        sharify.load(saved[1], model=OneStageNet(), strict="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got type \(a class: pass an instance, model=OneStageNet\(\.\.\.\)\)"):
        sharify.load(saved[1], model=OneStageNet)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata must be a mapping of str to str, got str"):
        sharify.save(saved[0], saved[1], metadata="epoch=3")  # type: ignore[arg-type]
    with torch.device("meta"):
        skeleton = _shared()
    with pytest.raises(ValueError, match="on the meta device"):
        sharify.save(skeleton, saved[1].with_name("meta.safetensors"))
    assert sorted(p.name for p in saved[1].parent.iterdir()) == ["m.safetensors"]


# --- report -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "match"),
    [
        (PlainNet(), r"PlainNet and a OneStageNet that differ.*`features\.0\.weight` is in the original model only"),
        (OneStageNet(depth=4), r"`blocks\.3\.conv1\.weight` is in the original model only"),
        (OneStageNet(num_classes=10), r"`fc\.weight` has shape \(10, 8\) in the original but \(4, 8\) in the shared"),
        (OneStageNet(depth=2), r"`blocks\.2\.conv1\.weight` is in the shared model only"),
        (OneStageNet(width=16), r"`stem\.weight` has shape \(16, 3, 3, 3\) in the original"),
    ],
    ids=["unrelated", "deeper", "other head", "shallower", "wider"],
)
def test_report_refuses_models_that_differ_outside_the_groups(original: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sharify.report(original, _shared())


@pytest.mark.parametrize(
    "options", [{}, {"init": "scaled"}, {"method": "basis", "shared_rank": 4, "unique_rank": 1}, {"align": True}]
)
def test_report_still_accepts_the_original_of_every_kind_of_sharing(options: dict[str, object]) -> None:
    original = OneStageNet()
    shared = sharify.sharify(original, example_inputs=X, **options)
    assert sharify.report(OneStageNet(), shared).params_before == sum(p.numel() for p in original.parameters())
    assert sharify.report(nn.DataParallel(original), nn.DataParallel(shared)).groups


def test_report_with_swapped_or_unshared_arguments() -> None:
    original, shared = OneStageNet(), _shared()
    with pytest.raises(ValueError, match=r"no shared convs \(are the arguments swapped"):
        sharify.report(shared, original)
    with pytest.raises(ValueError, match=r"no shared convs; pass the model sharify\.sharify returned"):
        sharify.report(original, OneStageNet())
    with pytest.raises(ValueError, match="already sharified"):
        sharify.report(copy.deepcopy(shared), shared)
    with pytest.raises(TypeError, match="shared is a str"):
        sharify.report(original, "shared")  # type: ignore[arg-type]


# --- Recipe.from_json, ModelSource ------------------------------------------------------------------------


def test_recipe_from_json_and_model_source_check_their_arguments() -> None:
    with pytest.raises(TypeError, match="expects the recipe's JSON text, got dict"):
        sharify.Recipe.from_json({"format": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not JSON"):
        sharify.Recipe.from_json("{not json")
    with pytest.raises(TypeError, match=r"ModelSource\.library must be a non-empty str"):
        sharify.ModelSource(3, "resnet18")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ModelSource\.name must be a non-empty str"):
        sharify.ModelSource("torchvision", "")
    with pytest.raises(TypeError, match=r"ModelSource\.kwargs must be a dict"):
        sharify.ModelSource("torchvision", "resnet18", [("num_classes", 10)])  # type: ignore[arg-type]
