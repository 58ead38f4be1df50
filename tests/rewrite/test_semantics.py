"""What a sharified model must guarantee: single ownership of shared tensors and all that follows.

(issue 2, Behaviour 3: state_dict, safetensors, torch.save, deepcopy/pickle, load_state_dict, EMA,
gradients, compile/export, FX traceability, conv-BN fusion, deterministic names, unshare.)
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import sharify
from sharify.layers import SHARED_STORE_NAME
from tests.conftest import state_equal
from tests.nets import cifar_resnet


@pytest.fixture(scope="module")
def resnet18_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, sharify.sharify(model).eval()


def _small() -> tuple[nn.Module, nn.Module]:
    model = cifar_resnet(20).eval()
    return model, sharify.sharify(model, example_inputs=torch.randn(1, 3, 32, 32)).eval()


def _shared_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if k.startswith(SHARED_STORE_NAME + ".")]


def test_one_state_dict_key_per_shared_tensor_and_no_aliasing(resnet18_pair) -> None:
    _, shared = resnet18_pair
    sd = shared.state_dict()
    assert _shared_keys(shared) == [f"{SHARED_STORE_NAME}.layer{i}.conv2.weight" for i in range(1, 5)]
    assert not any(k.startswith("layer1.0.conv2") for k in sd)
    storages = [t.untyped_storage().data_ptr() for t in sd.values() if t.numel()]
    assert len(storages) == len(set(storages))


def test_parameters_yield_each_shared_tensor_once(resnet18_pair) -> None:
    model, shared = resnet18_pair
    plan = sharify.plan(model)
    params = list(shared.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert sum(p.numel() for p in params) == plan.params_after
    assert len(list(shared.named_parameters(remove_duplicate=False))) == len(params)
    assert shared.layer1[0].conv2.weight is shared.layer1[1].conv2.weight is shared.sharify_shared.layer1.conv2.weight


def test_class_and_isinstance_preserved(resnet18_pair) -> None:
    _, shared = resnet18_pair
    assert type(shared) is torchvision.models.ResNet
    conv = shared.layer2[1].conv2
    assert isinstance(conv, nn.Conv2d) and sharify.is_shared_conv(conv)
    assert "shared='layer2.conv2'" in repr(conv)


def test_safetensors_and_torch_save_shrink_in_proportion(resnet18_pair, tmp_path) -> None:
    model, shared = resnet18_pair
    ratio = sum(p.numel() for p in shared.parameters()) / sum(p.numel() for p in model.parameters())
    save_file(model.state_dict(), tmp_path / "a.safetensors")
    save_file(shared.state_dict(), tmp_path / "b.safetensors")
    size = os.path.getsize
    assert size(tmp_path / "b.safetensors") / size(tmp_path / "a.safetensors") == pytest.approx(ratio, rel=0.01)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    torch.save(shared.state_dict(), tmp_path / "b.pt")
    assert size(tmp_path / "b.pt") / size(tmp_path / "a.pt") == pytest.approx(ratio, rel=0.01)
    loaded = load_file(tmp_path / "b.safetensors")
    fresh = sharify.sharify(torchvision.models.resnet18(num_classes=10), init="random")
    fresh.load_state_dict(loaded)
    assert state_equal(fresh, shared)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_their_own_sharing(how: str) -> None:
    _, shared = _small()
    if how == "deepcopy":
        other = copy.deepcopy(shared)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(shared))
    else:
        buf = io.BytesIO()
        torch.save(shared, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    members = [other.layer1[i].conv2 for i in range(3)]
    assert all(m.weight is other.sharify_shared.layer1.conv2.weight for m in members)
    assert other.layer1[0].conv2.weight is not shared.layer1[0].conv2.weight
    with torch.no_grad():
        other.sharify_shared.layer1.conv2.weight.add_(1.0)
    assert not torch.equal(other.layer1[2].conv2.weight, shared.layer1[2].conv2.weight)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(other(x), shared(x))


def test_load_state_dict_round_trips_plain_assign_and_meta() -> None:
    _, shared = _small()
    sd = shared.state_dict()
    x = torch.randn(2, 3, 32, 32)
    expected = shared(x)
    plain = sharify.sharify(cifar_resnet(20), example_inputs=x, init="random").eval()
    plain.load_state_dict(sd)
    assert torch.equal(plain(x), expected)

    assigned = sharify.sharify(cifar_resnet(20), example_inputs=x, init="random").eval()
    assigned.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    holder = assigned.sharify_shared.layer2.conv2
    assert all(assigned.layer2[i].conv2.weight is holder.weight for i in range(1, 3))
    assert torch.equal(assigned(x), expected)

    with torch.device("meta"):
        meta = cifar_resnet(20)
    meta = sharify.sharify(meta, example_inputs=x).eval()
    assert meta.sharify_shared.layer1.conv2.weight.is_meta
    meta.to_empty(device="cpu")
    meta.load_state_dict(sd)
    assert meta.layer1[1].conv2.weight is meta.sharify_shared.layer1.conv2.weight
    assert torch.equal(meta(x), expected)


def test_gradient_of_shared_weight_is_sum_over_members() -> None:
    torch.manual_seed(0)
    original = cifar_resnet(20).train()
    with torch.no_grad():  # make members identical so both models compute the same function
        for layer in (original.layer1, original.layer2, original.layer3):
            for block in layer[1:]:
                block.conv2.weight.copy_(layer[1].conv2.weight)
            if layer[0].conv2.stride == (1, 1):
                layer[0].conv2.weight.copy_(layer[1].conv2.weight)
    shared = sharify.sharify(original, example_inputs=torch.randn(1, 3, 32, 32)).train()
    x = torch.randn(4, 3, 32, 32)
    original(x).square().sum().backward()
    shared(x).square().sum().backward()
    for key, (holder, members) in sharify.shared_groups(shared).items():
        expected = sum(original.get_submodule(m).weight.grad for m in members)
        torch.testing.assert_close(holder.weight.grad, expected, rtol=1e-4, atol=1e-5, msg=key)


def test_identical_members_give_identical_outputs() -> None:
    original = torchvision.models.resnet34().eval()
    with torch.no_grad():
        for layer in (original.layer1, original.layer2, original.layer3, original.layer4):
            for block in layer:
                block.conv2.weight.copy_(layer[-1].conv2.weight)
    shared = sharify.sharify(original).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(original(x), shared(x))


def test_timm_ema_moves_shared_weight_by_one_step() -> None:
    from timm.utils import ModelEmaV3

    _, shared = _small()
    ema = ModelEmaV3(shared, decay=0.9)
    before = ema.module.sharify_shared.layer1.conv2.weight.detach().clone()
    with torch.no_grad():
        shared.sharify_shared.layer1.conv2.weight.add_(1.0)
    ema.update(shared)
    after = ema.module.sharify_shared.layer1.conv2.weight
    torch.testing.assert_close(after, 0.9 * before + 0.1 * shared.sharify_shared.layer1.conv2.weight)
    assert ema.module.layer1[2].conv2.weight is after


def test_optimizer_state_resumes_with_deterministic_names() -> None:
    x = torch.randn(2, 3, 32, 32)
    a = sharify.sharify(cifar_resnet(20), example_inputs=x)
    b = sharify.sharify(cifar_resnet(20), example_inputs=x)
    assert list(a.state_dict()) == list(b.state_dict())
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    a(x).sum().backward()
    opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read from disk (no aliasing)
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert state_equal(a, b)


def test_fx_feature_extraction_of_sharified_model(resnet18_pair) -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    _, shared = resnet18_pair
    extractor = create_feature_extractor(shared, return_nodes={"layer2": "feat"})
    out = extractor(torch.randn(1, 3, 64, 64))["feat"]
    assert out.shape == (1, 128, 8, 8)
    names = [n for n, _ in extractor.named_parameters()]
    assert sum("sharify_shared.layer1.conv2.weight" in n for n in names) == 1
    assert not any(n.startswith("sharify_shared.layer3") for n in names)  # unused past layer2


def test_timm_feature_graph_net_of_sharified_model() -> None:
    import timm
    from timm.models import FeatureGraphNet

    model = timm.create_model("resnet18", num_classes=10)
    shared = sharify.sharify(model)
    net = FeatureGraphNet(shared, out_indices=(1, 2, 3))
    feats = net(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [64, 128, 256]


def test_conv_bn_fusion_unshares_only_the_fused_conv() -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    _, shared = _small()
    holder = shared.sharify_shared.layer1.conv2
    x = torch.randn(2, 3, 32, 32)
    expected = shared(x)
    fused = fuse_conv_bn_eval(shared.layer1[1].conv2, shared.layer1[1].bn2)  # a fused copy
    assert type(fused) is nn.Conv2d and "weight" in dict(fused.named_parameters())
    assert all(shared.layer1[i].conv2.weight is holder.weight for i in range(3))
    shared.layer1[1].conv2, shared.layer1[1].bn2 = fused, nn.Identity()
    torch.testing.assert_close(shared(x), expected, rtol=1e-4, atol=1e-4)
    assert shared.layer1[0].conv2.weight is holder.weight


def test_fx_fuse_pass_runs_on_sharified_model() -> None:
    from torch.fx.experimental.optimization import fuse

    _, shared = _small()
    x = torch.randn(2, 3, 32, 32)
    fused = fuse(shared)  # shared members are traced through (not fused); the others are fused
    torch.testing.assert_close(fused(x), shared(x), rtol=1e-4, atol=1e-4)
    assert shared.layer1[0].conv2.weight is shared.sharify_shared.layer1.conv2.weight


def test_assigning_weight_unshares_that_conv_only() -> None:
    _, shared = _small()
    conv = shared.layer1[1].conv2
    new = nn.Parameter(torch.zeros_like(conv.weight))
    conv.weight = new
    assert type(conv) is nn.Conv2d and conv.weight is new
    assert shared.layer1[0].conv2.weight is shared.sharify_shared.layer1.conv2.weight
    assert "layer1.1.conv2.weight" in shared.state_dict()


def test_torch_compile() -> None:
    from tests.nets import FlatNet

    x = torch.randn(2, 3, 16, 16)
    shared = sharify.sharify(FlatNet(c=8, depth=3), example_inputs=x)
    compiled = torch.compile(shared)
    torch.testing.assert_close(compiled(x), shared(x), rtol=1e-4, atol=1e-4)
    compiled(x).sum().backward()
    assert shared.get_submodule("sharify_shared.conv2.0").weight.grad is not None


def test_torch_export_has_one_input_per_shared_tensor() -> None:
    _, shared = _small()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(shared, (x,))
    params = ep.graph_signature.parameters
    assert len(params) == len(list(shared.parameters()))
    assert sum(p.startswith(SHARED_STORE_NAME) for p in params) == 3
    torch.testing.assert_close(ep.module()(x), shared(x))


def test_unshare_materialises_independent_convs_and_scripts() -> None:
    model, shared = _small()
    plain = sharify.unshare(shared)
    assert not hasattr(plain, SHARED_STORE_NAME) and sharify.is_shared_conv(shared.layer1[0].conv2)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())
    assert plain.layer1[0].conv2.weight is not plain.layer1[1].conv2.weight
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(plain)
    torch.testing.assert_close(scripted(x), shared(x))
