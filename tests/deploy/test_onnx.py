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


def _int8_initializers(proto: object) -> dict[str, np.ndarray]:
    inits = proto.graph.initializer  # type: ignore[attr-defined]
    return {i.name: onnx.numpy_helper.to_array(i) for i in inits if i.data_type == onnx.TensorProto.INT8}


@pytest.mark.parametrize("folded", [False, True], ids=["int8", "folded-bn+int8"])
def test_int8_export_is_qdq_with_one_int8_initializer_per_weight(
    models: tuple[nn.Module, nn.Module], tmp_path: Path, folded: bool
) -> None:
    _, shared = models  # randomised BatchNorm statistics: a per-member fold would show
    q = sharify.quantize_int8(sharify.fold_batchnorm(shared) if folded else shared).eval()
    path = sharify.export_onnx(q, tmp_path / "q.onnx", X)  # checked: each int8 weight once, outputs equal
    proto = onnx.load(str(path))
    int8 = _int8_initializers(proto)
    expected = {k: v for k, v in q.state_dict().items() if v.dtype == torch.int8}  # one per holder, conv, Linear
    assert sorted(int8) == sorted(expected)
    assert all(np.array_equal(int8[k], v.numpy()) for k, v in expected.items())
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    readers = {n.output[0]: consumers.get(n.output[0], []) for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    for name in int8:  # every int8 weight is read by DequantizeLinear only, per output channel, no zero point
        nodes = consumers[name]
        assert {n.op_type for n in nodes} == {"DequantizeLinear"}, name
        for n in nodes:
            assert onnx.helper.get_attribute_value(n.attribute[0]) == 0 and n.attribute[0].name == "axis"
            assert len(n.input) == 2 or not n.input[2], "zero point omitted"
            assert {r.op_type for r in readers[n.output[0]]} <= {"Conv", "Gemm", "MatMul", "Transpose"}
    for holder, members in sharify.shared_groups(q).values():  # each member's Conv reads the one int8 initializer
        name = next(k for k, v in expected.items() if v.data_ptr() == holder.weight_int8.data_ptr())
        convs = [r for n in consumers[name] for r in readers[n.output[0]] if r.op_type == "Conv"]
        assert len(convs) == len(members) > 1
    shapes = {v.shape for v in int8.values()}
    assert not [
        i.name for i in proto.graph.initializer if i.data_type != onnx.TensorProto.INT8 and tuple(i.dims) in shapes
    ]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = q(x).numpy()
    np.testing.assert_allclose(_run(path, x), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def _rewired(path: Path, out: Path, dequantised: bool) -> str:
    """The file with its first shared int8 initializer duplicated (one member's DequantizeLinear reads the copy) or,
    with ``dequantised``, replaced by the float weight it stands for; returns the initializer's name."""
    proto = onnx.load(str(path))
    name = next(i.name for i in proto.graph.initializer if i.name.startswith("sharify_shared."))
    init = next(i for i in proto.graph.initializer if i.name == name)
    q = onnx.numpy_helper.to_array(init)
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name)
    if dequantised:  # a float constant in place of the int8 weight and its DequantizeLinear (as a constant fold would)
        scale = next(onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == dq.input[1])
        weight = onnx.numpy_helper.from_array(q.astype(np.float32) * scale.reshape(-1, 1, 1, 1), name + "_float")
        proto.graph.initializer.remove(init)
        proto.graph.initializer.append(weight)
        for node in [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name]:
            node.CopyFrom(onnx.helper.make_node("Identity", [weight.name], list(node.output)))
    else:
        proto.graph.initializer.append(onnx.numpy_helper.from_array(q.copy(), name + "_copy"))
        dq.input[0] = name + "_copy"
    onnx.save(proto, str(out))
    return name


def test_check_names_a_duplicated_or_dequantised_int8_shared_weight(
    models: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    _, shared = models
    q = sharify.quantize_int8(shared)
    path = sharify.export_onnx(q, tmp_path / "q.onnx", X)
    name = _rewired(path, tmp_path / "duplicated.onnx", dequantised=False)
    with pytest.raises(sharify.ExportError) as info:
        check_onnx(q, tmp_path / "duplicated.onnx", X)
    assert "stores 1 of 3 shared tensors more than once" in str(info.value)
    assert f"`{name}` (8x8x3x3) 2 times: {name}, {name}_copy" in str(info.value)
    name = _rewired(path, tmp_path / "dequantised.onnx", dequantised=True)
    with pytest.raises(sharify.ExportError, match=rf"as floating point .*`{name}` as {name}_float"):
        check_onnx(q, tmp_path / "dequantised.onnx", X)


def test_exporter_debugging_metadata_is_dropped_unless_kept(
    models: tuple[nn.Module, nn.Module], exported: Path, tmp_path: Path
) -> None:
    _, shared = models
    assert not any(n.metadata_props for n in onnx.load(str(exported)).graph.node)
    kept = sharify.export_onnx(shared, tmp_path / "kept.onnx", X, keep_metadata=True)
    keys = {p.key for n in onnx.load(str(kept)).graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.stack_trace" in keys  # where each node came from: debugging, not inference
    assert kept.stat().st_size > exported.stat().st_size
