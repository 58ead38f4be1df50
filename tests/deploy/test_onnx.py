"""ONNX export keeps each shared tensor once (issue 17): sharify.export_onnx and its check, on small models with
randomised BatchNorm statistics (with the default ones, the legacy exporter's folded copies are equal and merge)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sharify
from sharify.deploy import check_onnx
from sharify.deploy import onnx as deploy_onnx
from tests.conftest import perturb
from tests.nets import cifar_resnet, wide_resnet

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

X = torch.randn(1, 3, 32, 32)


def _stats(model: nn.Module) -> nn.Module:
    """Randomised BatchNorm statistics and affine parameters (every member's BatchNorm scales differently)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))  # type: ignore[union-attr]
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)  # type: ignore[union-attr]
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = _stats(cifar_resnet(14, width=8))
    return original, sharify.sharify(original, example_inputs=X)


@pytest.fixture(scope="module")
def exported(models: tuple[nn.Module, nn.Module], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared model exported in train mode with the default inputs (the shapes sharify's analysis used)."""
    shared = models[1].train()
    path = sharify.export_onnx(shared, tmp_path_factory.mktemp("onnx") / "m.onnx")
    assert shared.training and all(m.training for m in shared.modules())  # each module's mode restored
    return path


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_export_stores_each_shared_tensor_once(models: tuple[nn.Module, nn.Module], exported: Path) -> None:
    original, shared = models
    path = exported
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]  # one file: no external data, no temporary left
    check = check_onnx(shared, path)
    groups = sharify.shared_groups(shared)
    assert [(c.key, c.count) for c in check.tensors] == [(k, 1) for k in groups]
    # the member convs read the holder's tensor itself: stored under its state_dict name, unscaled
    assert all(c.exact == (c.name,) and c.name.startswith("sharify_shared.") for c in check.tensors)
    report = sharify.report(original, shared)
    assert check.params == report.params_after < report.params_before
    # the file stores the parameters once and some BatchNorm statistics: nothing per member
    assert report.params_after <= check.stored_elements <= report.params_after + check.buffers
    assert check.max_abs_diff is not None and check.tolerance is not None and check.max_abs_diff <= check.tolerance
    # any batch size (dynamic_batch=True), outputs as PyTorch's in eval mode
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(shared).eval()(x).numpy()
    np.testing.assert_allclose(_run(path, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_basis_members_store_their_shared_basis_once(tmp_path: Path) -> None:
    original = _stats(cifar_resnet(20, width=8))  # 3 blocks a stage: the preset skips the first
    shared = sharify.sharify(original, example_inputs=X, preset="dsfb-basis", shared_rank=4, unique_rank=1)
    check = check_onnx(shared, sharify.export_onnx(shared, tmp_path / "basis.onnx", X, dynamic_batch=False))
    assert {c.count for c in check.tensors} == {1} and len(check.tensors) == 2 * 3  # conv1, conv2 of 3 stages
    assert check.params == sharify.report(original, shared).params_after


def test_member_gains_are_not_folded_into_copies(tmp_path: Path) -> None:
    # init="scaled" on a pre-activation net: no BatchNorm after the members, so each multiplies the shared weight
    # by its own gain at run time; constant folding of that product would store one copy per member.
    shared = sharify.sharify(perturb(wide_resnet(16, 1)), example_inputs=X, init="scaled")
    assert any(n.endswith("shared_gain") for n, _ in shared.named_parameters())
    check = check_onnx(shared, sharify.export_onnx(shared, tmp_path / "wrn.onnx", X, dynamic_batch=False))
    assert {c.count for c in check.tensors} == {1}


def test_legacy_exporter_duplicates_are_named(models: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    _, shared = models
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated
        torch.onnx.export(copy.deepcopy(shared).eval(), (X,), str(path), dynamo=False)
    with pytest.raises(sharify.ExportError) as info:
        check_onnx(shared, path, X)
    message = str(info.value)
    assert "stores 3 of 3 shared tensors more than once" in message
    # each member's BatchNorm folded into its own copy: layer1 has 2 members (skip_first_block=False, n=2)
    assert "`sharify_shared.layer1.conv2.weight` (8x8x3x3) 2 times" in message and "(scaled per channel)" in message
    assert "sharify.export_onnx" in message and "dynamo=True" in message


def test_legacy_duplicates_hide_behind_default_batchnorm_statistics(tmp_path: Path) -> None:
    # Every member folds the same default BatchNorm (scale 1/sqrt(1 + eps)): equal copies, merged into one.
    shared = sharify.sharify(cifar_resnet(14, width=8), example_inputs=X)
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(copy.deepcopy(shared).eval(), (X,), str(path), dynamo=False)
    check = check_onnx(shared, path, X)
    assert {c.count for c in check.tensors} == {1} and all(c.scaled and not c.exact for c in check.tensors)


def test_hugging_face_resnet(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic",
                                       num_labels=3)  # fmt: skip
    original = _stats(transformers.ResNetForImageClassification(config))
    shared = sharify.sharify(original, example_inputs=X)
    check = check_onnx(shared, sharify.export_onnx(shared, tmp_path / "hf.onnx", X))
    assert len(check.tensors) == 2 and {c.count for c in check.tensors} == {1}
    assert check.max_abs_diff is not None and check.max_abs_diff <= check.tolerance  # logits of the ModelOutput


def test_failed_check_writes_no_file(
    models: tuple[nn.Module, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, shared = models
    monkeypatch.setattr(deploy_onnx, "ELEMENTS_SLACK", -0.5)  # any file is "too large"
    with pytest.raises(sharify.ExportError, match=r"stores [\d,]+ elements, more than the model's [\d,]+ parameters"):
        sharify.export_onnx(shared, tmp_path / "m.onnx", X, dynamic_batch=False)
    assert list(tmp_path.iterdir()) == []


def test_example_inputs_are_required_when_the_model_records_none(tmp_path: Path) -> None:
    with pytest.raises(sharify.ExampleInputsError, match=r"needs example inputs for CifarResNet.*pass example_inputs"):
        sharify.export_onnx(cifar_resnet(8), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module, got str"):
        sharify.export_onnx("model", tmp_path / "m.onnx")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_check_names_a_missing_shared_tensor(exported: Path) -> None:
    # The file exported from another model does not hold this model's shared tensors at all.
    torch.manual_seed(1)
    other = sharify.sharify(_stats(cifar_resnet(14, width=8)), example_inputs=X)
    with pytest.raises(sharify.ExportError, match=r"stores no copy of 3 shared tensors \(`sharify_shared.layer1"):
        check_onnx(other, exported, run=False)


def test_example_inputs_the_model_cannot_run_are_named(models: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    _, shared = models
    with pytest.raises(sharify.ExampleInputsError, match=r"cannot run on example inputs of shape \(2, 5, 32, 32\)"):
        sharify.export_onnx(shared, tmp_path / "m.onnx", torch.randn(2, 5, 32, 32))
    assert not (tmp_path / "m.onnx").exists()
