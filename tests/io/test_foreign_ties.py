"""Ties the model's authors made themselves, and models sharified inside bigger models (issue 14, items 4 and 5).

* A conv module reused by several blocks, or ``b.conv.weight = a.conv.weight``: ``state_dict()`` lists one
  tensor under several keys. ``save`` stores it once and records the other keys as aliases; ``load`` ties them
  again, so the loaded model has exactly the original's ties.
* ``sharify(det.backbone.body, inplace=True)``: the store lives in the submodule. Every tool that finds groups
  (verify, retie, save, load, unshare, report, orthogonality_loss, shared_groups, load_unshared_state_dict) finds
  it from the enclosing model, with keys prefixed by the submodule's path.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import sharify
from sharify.layers import holder_paths, shared_stores
from tests.foreign_nets import ReusedConvNet, TwoStreamNet, tie_by_assignment

X = torch.rand(2, 3, 16, 16)


def _eval_equal(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> bool:
    a.eval()
    b.eval()
    with torch.no_grad():
        return torch.equal(a(*inputs), b(*inputs))


def _stored_keys(path: object) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


# ------------------------------------------------------------------------------------------------------------
# 1. Ties the model's authors made
# ------------------------------------------------------------------------------------------------------------


def test_reused_conv_module_saves_once_and_loads_tied(tmp_path):
    model = ReusedConvNet()
    path = sharify.save(model, tmp_path / "plain.safetensors")
    recipe = sharify.read_recipe(path)
    assert recipe.aliases == {
        "layer1.1.conv2.weight": "layer1.0.conv2.weight",
        "layer1.2.conv2.weight": "layer1.0.conv2.weight",
    }
    assert _stored_keys(path) == set(model.state_dict()) - set(recipe.aliases)  # each tensor stored once
    loaded = sharify.load(path, model=ReusedConvNet())
    assert loaded.layer1[0].conv2 is loaded.layer1[2].conv2
    assert _eval_equal(model, loaded, X)


def test_tie_by_assignment_is_restored_in_a_fresh_model(tmp_path):
    model = tie_by_assignment(ReusedConvNet(), "layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1")
    path = sharify.save(model, tmp_path / "tied.safetensors")
    fresh = ReusedConvNet()  # built without the hand-made tie
    assert fresh.layer2[0].conv1.weight is not fresh.layer2[1].conv1.weight
    loaded = sharify.load(path, model=fresh)
    assert loaded.layer2[0].conv1.weight is loaded.layer2[1].conv1.weight is loaded.layer2[2].conv1.weight
    assert _eval_equal(model, loaded, X)
    assert fresh.layer2[0].conv1.weight is not fresh.layer2[1].conv1.weight  # the caller's model is untouched


def test_sharified_model_with_its_own_ties(tmp_path):
    model = tie_by_assignment(ReusedConvNet(), "layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1")
    shared = sharify.sharify(model)
    assert sharify.verify(shared) == [] and sharify.retie(shared) == []  # a user tie is not a broken group
    path = sharify.save(shared, tmp_path / "shared.safetensors")
    assert sharify.read_recipe(path).aliases  # the user's ties are recorded next to the groups
    loaded = sharify.load(path, model=ReusedConvNet())
    assert sharify.verify(loaded) == []
    assert loaded.layer1[0].conv2 is loaded.layer1[1].conv2
    assert loaded.layer2[0].conv1.weight is loaded.layer2[2].conv1.weight
    assert _eval_equal(shared, loaded, X)
    plain = sharify.unshare(shared)
    assert plain.layer2[0].conv1.weight is plain.layer2[1].conv1.weight
    assert sorted(plain.state_dict()) == sorted(model.state_dict())
    r = sharify.report(model, shared)
    assert r.params_before == sum(p.numel() for p in model.parameters()) > r.params_after
    fresh = sharify.sharify(tie_by_assignment(ReusedConvNet(), "layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1"))
    result = sharify.load_unshared_state_dict(fresh, model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys


def test_load_refuses_a_model_that_ties_what_the_file_keeps_apart(tmp_path):
    path = sharify.save(ReusedConvNet(), tmp_path / "untied.safetensors")
    tied = tie_by_assignment(ReusedConvNet(), "layer2.0.conv1", "layer2.1.conv1")
    with pytest.raises(
        sharify.RecipeMismatchError, match=r"`layer2\.1\.conv1\.weight` and `layer2\.0\.conv1\.weight` are one"
    ):
        sharify.load(path, model=tied)


def test_views_of_one_buffer_are_saved_as_copies(tmp_path):
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            flat = torch.arange(8.0)
            self.register_buffer("a", flat[:6])
            self.register_buffer("b", flat[2:])  # overlaps `a` without being it

    model = Views()
    loaded = sharify.load(sharify.save(model, tmp_path / "views.safetensors"), model=Views())
    assert torch.equal(loaded.a, model.a) and torch.equal(loaded.b, model.b)


@pytest.mark.filterwarnings("ignore:the root is an Sequential")
def test_recipe_without_ties_or_nested_stores_keeps_format_1(tmp_path):
    path = sharify.save(sharify.sharify(TwoStreamNet().rgb), tmp_path / "plain.safetensors")
    with safe_open(str(path), framework="pt") as f:
        data = json.loads(f.metadata()["sharify"])
    assert data["format"] == 1
    assert not {"stores", "aliases"} & set(data) and all("store" not in g for g in data["groups"])


def test_damaged_alias_entry_is_a_checkpoint_error(tmp_path):
    path = sharify.save(ReusedConvNet(), tmp_path / "plain.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    data = json.loads(meta["sharify"])
    data["aliases"] = {"layer1.1.conv2.weight": "no.such.weight"}
    save_file(load_file(str(path)), str(path), metadata={**meta, "sharify": json.dumps(data)})
    with pytest.raises(sharify.CheckpointError, match=r"`no\.such\.weight`, which the file does not have"):
        sharify.load(path, model=ReusedConvNet())


# ------------------------------------------------------------------------------------------------------------
# 2. Models inside bigger models
# ------------------------------------------------------------------------------------------------------------


def _detector() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64
    )


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    det = _detector()
    sharify.sharify(det.backbone.body, inplace=True)
    return det


def test_detector_with_sharified_backbone_verifies_and_reties(detector):
    det = copy.deepcopy(detector)
    assert sharify.verify(det) == []
    assert sharify.retie(det) == []
    assert list(shared_stores(det)) == ["backbone.body"]  # retie left no second store
    groups = sharify.shared_groups(det)
    assert list(groups) == [f"backbone.body.layer{i}.conv2" for i in range(1, 5)]
    assert groups["backbone.body.layer1.conv2"][1][0] == "backbone.body.layer1.0.conv2"
    assert holder_paths(det)["backbone.body.layer1.conv2"] == "backbone.body.sharify_shared.layer1.conv2"
    assert sharify.orthogonality_loss(det).item() == 0.0


def test_detector_trains_with_one_tensor_per_group(detector):
    det = copy.deepcopy(detector).train()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    sum(det(images, targets).values()).backward()
    holder = sharify.shared_groups(det)["backbone.body.layer2.conv2"][0]
    assert holder.weight.grad is not None and holder.weight.grad.abs().sum() > 0
    names = [n for n, _ in det.named_parameters()]
    assert len(names) == len(set(names)) and "backbone.body.sharify_shared.layer2.conv2.weight" in names


def test_detector_save_load_report_unshare(detector, tmp_path):
    with pytest.warns(UserWarning, match="saving FasterRCNN without a source"):
        path = sharify.save(detector, tmp_path / "det.safetensors")
    recipe = sharify.read_recipe(path)
    assert list(recipe.stores) == ["backbone.body"] and recipe.options is None
    assert {g.store for g in recipe.groups} == {"backbone.body"}
    original = _detector()
    loaded = sharify.load(path, model=original)
    assert list(sharify.shared_groups(loaded)) == list(sharify.shared_groups(detector))
    assert sharify.verify(loaded) == []
    image = [torch.rand(3, 64, 64)]
    detector.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = detector(image)[0], loaded(image)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = sharify.load(path, model=loaded)  # an already sharified detector: groups checked, weights loaded
    assert list(sharify.shared_groups(again)) == list(sharify.shared_groups(detector))

    assert not shared_stores(original)  # load sharified a copy
    r = sharify.report(original, detector)
    assert [g.stage for g in r.groups] == [f"backbone.body.layer{i}" for i in range(1, 5)]
    assert r.params_before - r.params_after == sum(g.saved for g in r.groups) > 0

    plain = sharify.unshare(detector)
    assert sorted(plain.state_dict()) == sorted(original.state_dict())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in original.parameters())

    fresh = copy.deepcopy(detector)
    result = sharify.load_unshared_state_dict(fresh, original.state_dict())
    assert not result.missing_keys and not result.unexpected_keys


def test_sharify_on_the_enclosing_model_is_refused(detector):
    with pytest.raises(sharify.AlreadySharifiedError, match=r"its submodule `backbone\.body` was sharified"):
        sharify.sharify(detector)


@pytest.fixture
def two_stream() -> TwoStreamNet:
    torch.manual_seed(0)
    net = TwoStreamNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trunks are Sequentials: the store is appended to each
        sharify.sharify(net.rgb, inplace=True, example_inputs=torch.zeros(1, 3, 16, 16))
        sharify.sharify(
            net.flow,
            inplace=True,
            method="basis",
            shared_rank=16,
            unique_rank=8,
            example_inputs=torch.zeros(1, 2, 16, 16),
        )
    return net


def _fresh_two_stream() -> TwoStreamNet:
    torch.manual_seed(1)
    return TwoStreamNet()


@pytest.mark.filterwarnings("ignore:the root is an Sequential")
def test_two_independently_sharified_trunks(two_stream, tmp_path):
    net = two_stream
    assert sharify.verify(net) == [] and sharify.retie(net) == []
    groups = sharify.shared_groups(net)
    assert list(groups) == ["rgb.conv2", "flow.conv2"]
    assert groups["flow.conv2"][1] == ["flow.3.conv2.shared", "flow.4.conv2.shared", "flow.5.conv2.shared"]
    with torch.no_grad():
        groups["flow.conv2"][0].weight.mul_(2)
    loss = sharify.orthogonality_loss(net)
    assert loss.item() > 0 and loss.requires_grad

    path = sharify.save(net, tmp_path / "two.safetensors")
    recipe = sharify.read_recipe(path)
    assert recipe.stores["flow"]["options"]["method"] == "basis"
    assert recipe.stores["rgb"]["options"]["method"] == "share"
    loaded = sharify.load(path, model=_fresh_two_stream())
    flow = torch.rand(2, 2, 16, 16)
    assert _eval_equal(net, loaded, X, flow)
    assert torch.equal(sharify.orthogonality_loss(loaded), sharify.orthogonality_loss(net))
    r = sharify.report(_fresh_two_stream(), net)
    assert [g.stage for g in r.groups] == ["rgb", "flow"]
    plain = sharify.unshare(net)
    assert not shared_stores(plain) and not any(sharify.is_shared_conv(m) for m in plain.modules())


def test_retie_repairs_a_nested_store_in_place(two_stream):
    net = two_stream
    net.rgb[4] = copy.deepcopy(net.rgb[4])  # the copy reads a private copy of the holder
    problems = sharify.verify(net)
    assert len(problems) == 1 and "`rgb.4.conv2` read a copy of shared group `rgb.conv2`" in problems[0]
    assert sharify.retie(net) == ["re-pointed `rgb.4.conv2` to the registered holder `rgb.conv2`"]
    assert sharify.verify(net) == [] and sorted(shared_stores(net)) == ["flow", "rgb"]


def test_retie_registers_an_orphan_where_its_store_was(two_stream):
    net = two_stream
    del net.rgb.sharify_shared
    problems = sharify.verify(net)
    assert len(problems) == 1 and "no `rgb.sharify_shared.conv2`" in problems[0]
    with pytest.raises(sharify.TieError, match="cannot save"):
        sharify.save(net, "unused.safetensors")
    assert sharify.retie(net) == [
        "registered holder `conv2` as `rgb.sharify_shared.conv2` (created the store; the sharing options it "
        "recorded are unknown)"
    ]
    assert sorted(shared_stores(net)) == ["flow", "rgb"] and list(sharify.shared_groups(net)) == [
        "rgb.conv2",
        "flow.conv2",
    ]


def test_torchvision_classifier_with_sharified_stages_loads_from_its_source(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sharify.sharify(model.layer2, inplace=True, example_inputs=torch.zeros(1, 64, 16, 16))
        sharify.sharify(model.layer3, inplace=True, example_inputs=torch.zeros(1, 128, 8, 8))
        path = sharify.save(model, tmp_path / "r18.safetensors")
        recipe = sharify.read_recipe(path)
        assert recipe.source is not None and recipe.source.name == "resnet18"  # the stores are not foreign modules
        loaded = sharify.load(path)
    assert list(sharify.shared_groups(loaded)) == ["layer2.conv2", "layer3.conv2"]
    assert _eval_equal(model, loaded, torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------------------
# 3./4. Wrong types, wrappers and odd states
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn", [sharify.verify, sharify.retie, sharify.unshare, sharify.shared_groups, sharify.orthogonality_loss]
)
def test_group_tools_refuse_non_modules(fn):
    with pytest.raises(TypeError, match=rf"{fn.__name__} expects a torch\.nn\.Module.*got str"):
        fn("x")


def test_unshare_refuses_a_wrapper_and_bad_inplace():
    shared = sharify.sharify(ReusedConvNet())
    with pytest.raises(sharify.UnsupportedModelError, match=r"DataParallel wrapper; unshare the bare model"):
        sharify.unshare(nn.DataParallel(shared))
    with pytest.raises(TypeError, match="inplace must be True or False"):
        sharify.unshare(shared, inplace="no")  # type: ignore[arg-type]
    assert sharify.shared_groups(shared)  # untouched


def test_orthogonality_loss_without_bases_is_a_zero_tensor():
    loss = sharify.orthogonality_loss(sharify.sharify(ReusedConvNet()))
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.item() == 0.0


def test_report_refuses_a_copied_block_whose_holder_is_nowhere():
    model = torchvision.models.resnet18(num_classes=10)
    block = copy.deepcopy(sharify.sharify(model).layer1)
    assert sharify.shared_groups(block) == {}  # no store in the copy
    with pytest.raises(sharify.TieError, match=r"cannot report on Sequential: its sharing is broken.*sharify\.retie"):
        sharify.report(model.layer1, block)
    sharify.retie(block)  # the block's own store; no stage prefix to strip in a copy
    assert list(sharify.shared_groups(block)) == ["layer1.conv2"]
    assert sharify.report(model.layer1, block).params_after < sum(p.numel() for p in model.layer1.parameters())


def test_meta_device_model_is_checked_reported_and_unshared():
    model = ReusedConvNet()
    shared = sharify.sharify(model).to("meta")
    assert sharify.verify(shared) == [] and sharify.retie(shared) == []
    assert sharify.report(model, shared).params_after < sharify.report(model, shared).params_before
    plain = sharify.unshare(shared)
    assert all(p.is_meta for p in plain.parameters()) and not shared_stores(plain)


def test_a_foreign_module_under_the_store_name_is_named(two_stream):
    net = two_stream
    net.rgb.sharify_shared = nn.Identity()
    assert sharify.verify(net) == ["`rgb.sharify_shared` is not sharify's store of shared tensors (it is Identity)"]
    with pytest.raises(sharify.TieError, match=r"`rgb\.sharify_shared` is not sharify's store"):
        sharify.retie(net)
    assert isinstance(net.rgb.sharify_shared, nn.Identity)  # nothing modified


def test_damaged_store_entry_is_a_checkpoint_error(two_stream, tmp_path):
    path = sharify.save(two_stream, tmp_path / "two.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    data = json.loads(meta["sharify"])
    del data["stores"]["flow"]
    save_file(load_file(str(path)), str(path), metadata={**meta, "sharify": json.dumps(data)})
    with pytest.raises(sharify.CheckpointError, match=r"damaged sharify recipe.*group `flow\.conv2` does not fit"):
        sharify.read_recipe(path)
