"""Tracing model code written elsewhere: Hugging Face vision CNNs, ``submodule.forward(x)`` calls, detectors.

Hugging Face forwards take optional arguments (``labels=None``, ``return_dict=None``, ``**kwargs``) that must
keep their defaults; old CIFAR code calls ``self.bn.forward(x)``; torchvision detectors and RAFT have a root
forward torch.fx cannot trace, so sharify analyses their traceable submodules (``plan.submodules``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sharify
from tests.conftest import state_equal
from tests.foreign_nets import CachingNet, ConstantStemNet, OldCifarResNet

transformers = pytest.importorskip("transformers")
detection = pytest.importorskip("torchvision.models.detection")


def _round_trip(shared: nn.Module, fresh: nn.Module, path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saved without a source" and the like are not what is tested here
        sharify.save(shared, path)
        return sharify.load(path, model=fresh)


# --- Hugging Face transformers -----------------------------------------------------------------------


def _hf_models() -> list[Any]:
    t = transformers
    return [
        pytest.param(
            t.ResNetForImageClassification,
            t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic", num_labels=3),
            2,
            id="resnet",
        ),
        pytest.param(
            t.RegNetForImageClassification,
            t.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[3, 3], groups_width=8, num_labels=3),
            2,
            id="regnet",
        ),
        pytest.param(
            t.BitForImageClassification,
            t.BitConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 2], num_groups=4, num_labels=3),
            1,
            id="bit",
        ),
    ]


@pytest.mark.parametrize(("cls", "config", "groups"), _hf_models())
def test_hf_vision_cnn_shares_with_one_call_and_round_trips(
    cls: type[nn.Module], config: Any, groups: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = cls(config).eval()
    before = copy.deepcopy(model)
    shared = sharify.sharify(model)
    assert type(shared) is cls and shared.config.to_dict() == model.config.to_dict()
    assert state_equal(model, before)  # the caller's model is untouched
    assert len(sharify.plan(model).groups) == groups
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = shared(x)
    assert out.logits.shape == (2, 3)
    assert shared(x, return_dict=False)[0].shape == (2, 3)  # the forward's other arguments still work
    loaded = _round_trip(shared, cls(config), tmp_path / "hf.safetensors").eval()
    assert type(loaded) is cls
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out.logits)


def test_hf_default_config_traces_and_default_input_follows_the_config() -> None:
    t = transformers
    plan = sharify.plan(t.ResNetForImageClassification(t.ResNetConfig()))
    # the embedder's `if num_channels != self.num_channels` is answered from the analysis input's value
    assert len(plan.groups) == 4 and not plan.auto_leaves
    assert plan.input_shapes == ((1, 3, 224, 224),) and plan.trace_stopped is None and not plan.submodules
    # config.num_channels decides the default input's channels (the stem checks them)
    gray = t.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic")
    assert sharify.plan(t.ResNetForImageClassification(gray)).input_shapes == ((1, 1, 224, 224),)


def test_hf_convnext_gets_the_depthwise_refusal_not_untraceable() -> None:
    t = transformers
    model = t.ConvNextForImageClassification(t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 2]))
    with pytest.raises(sharify.NothingToShareError, match=r"depthwise=True"):
        sharify.sharify(model)
    assert sharify.plan(model, depthwise=True).groups  # the refusal's hint is true


# --- submodule.forward(x) ----------------------------------------------------------------------------


def test_direct_forward_calls_share_exactly_as_module_calls(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    direct, called = OldCifarResNet(direct=True), OldCifarResNet(direct=False)
    a, b = sharify.plan(direct, example_inputs=x), sharify.plan(called, example_inputs=x)
    assert [(g.key, g.members) for g in a.groups] == [(g.key, g.members) for g in b.groups]
    assert len(a.groups) == 3 and a.params_after == b.params_after and not a.auto_leaves
    assert not any("forward" in m.__dict__ for m in direct.modules())  # the tracer's routing is gone
    shared = sharify.sharify(direct, example_inputs=x).eval()
    with torch.no_grad():
        out = shared(x)
    loaded = _round_trip(shared, OldCifarResNet(direct=True), tmp_path / "old.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


# Defined here, not in tests/nets.py: the pattern the next test is about.
class _DirectThenGated(nn.Module):
    """Calls a leaf through ``.forward`` and then stops the trace in its own code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv.forward(x)
        return x


def test_leaf_forward_routing_is_restored_when_the_trace_fails() -> None:
    model = _DirectThenGated()
    with pytest.raises(sharify.UntraceableError, match=r"`_DirectThenGated\.forward`"):
        sharify.plan(model)
    assert "forward" not in model.conv.__dict__


# --- models whose root forward cannot be traced ------------------------------------------------------


def _fasterrcnn() -> nn.Module:
    return detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=96, box_score_thresh=0.0
    )


def test_detector_shares_its_backbone_with_one_call(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _fasterrcnn()
    calls: list[Any] = []
    model.backbone.register_forward_hook(lambda *args: calls.append(args))  # the user's hook: no fake run for it
    with pytest.warns(UserWarning, match=r"cannot trace `FasterRCNN\.forward`.*`backbone`"):
        shared = sharify.sharify(model, inplace=True)
    members = [p for p, m in shared.named_modules() if sharify.is_shared_conv(m)]
    assert len(members) == 13 and all(p.startswith("backbone.body.layer") for p in members)
    assert not sharify.verify(shared) and not calls
    images = [torch.rand(3, 72, 64)]
    shared.train()
    losses = shared(images, [{"boxes": torch.tensor([[2.0, 3.0, 30.0, 40.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    grads = [p.grad for p in shared.sharify_shared.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    shared.eval()
    with torch.no_grad():
        out = shared(images)[0]
    assert out["boxes"].shape[0] > 0
    loaded = _round_trip(shared, _fasterrcnn(), tmp_path / "det.safetensors").eval()
    assert sharify.read_recipe(tmp_path / "det.safetensors").analysis["input_shapes"] == [[1, 3, 224, 224]]
    with torch.no_grad():
        again = loaded(images)[0]
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_retinanet_plan_says_which_submodules_were_analysed() -> None:
    model = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=64, max_size=96)
    plan = sharify.plan(model)
    assert len(plan.groups) == 4 and all(m.startswith("backbone.body.layer") for g in plan.groups for m in g.members)
    assert (
        plan.submodules["backbone"]
        == "analysed with inputs (1, 3, 64, 64) recorded from the forward of RetinaNet: 4 groups"
    )
    # the head's loop over its list of feature maps traces on the default input's value: nothing to share there
    assert plan.submodules["head"] == "analysed with its default inputs (1, 256, 224, 224): nothing to share"
    assert plan.to_dict()["submodules"] == plan.submodules
    assert "  submodule backbone: analysed" in str(plan) and "cannot trace `RetinaNet.forward`" in plan.notes[0]
    assert plan.input_shapes == ((1, 3, 224, 224),)  # the root's input, which decides the recorded calls
    # per-stage rank mappings are keyed by paths from the root, as for any model
    ranks = {f"backbone.body.layer{i}": i for i in range(1, 5)}
    basis = sharify.plan(model, method="basis", shared_rank=ranks, unique_rank=1)
    assert [g.shared_rank for g in basis.groups] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"shared_rank has entries for 'head\.x', which are no stage paths"):
        sharify.plan(model, method="basis", shared_rank={**ranks, "head.x": 2}, unique_rank=1)


def test_maskrcnn_heads_cut_mid_call_are_searched_not_crashed_on() -> None:
    # RoIHeads' trace stops inside a submodule call: that partial graph is not used (it refers to lost nodes).
    model = detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=64, max_size=96)
    plan = sharify.plan(model)
    assert len(plan.groups) == 4 and plan.submodules["roi_heads"].startswith("not analysed: torch.fx cannot trace")
    assert plan.submodules["roi_heads.mask_head"].endswith("nothing to share")


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_segmentation_models_are_still_traced_whole(name: str) -> None:
    from torchvision.models import segmentation

    model = getattr(segmentation, name)(weights=None, weights_backbone=None)
    plan = sharify.plan(model)
    assert len(plan.groups) == 4 and not plan.submodules and plan.trace_stopped is None


def test_raft_shares_its_encoders() -> None:
    # RAFT's encoders hold residual blocks; its update block (GRU, flow head) has nothing ShaResNet-style.
    from torchvision.models.optical_flow import raft_small

    model = raft_small(weights=None)
    attributes = {name: dict(m.__dict__) for name, m in model.named_modules()}
    plan = sharify.plan(model)
    # the fake-tensor run that records the submodules' inputs leaves nothing behind (RAFT caches its pyramid)
    assert {name: dict(m.__dict__) for name, m in model.named_modules()} == attributes
    assert {g.key.split(".")[0] for g in plan.groups} == {"feature_encoder", "context_encoder"}
    assert plan.submodules["update_block"].endswith("nothing to share")
    assert plan.submodules["feature_encoder"].startswith("analysed with inputs (2, 3, 224, 224) recorded")
    with pytest.warns(UserWarning, match=r"RAFT\.forward"):
        shared = sharify.sharify(model).eval()
    with torch.no_grad():
        flows = shared(torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128), num_flow_updates=1)
    assert flows[-1].shape == (1, 2, 128, 128)


# Defined here, not in tests/nets.py: the pattern the next test is about.
class _GatedBlocks(nn.Module):
    """Residual-free convs behind data-dependent root control flow: descending finds nothing to share."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.head(x[None])[0] for x in images if x.abs().sum() > 0])


def test_root_refusal_names_what_was_tried_and_does_not_suggest_leaf_modules() -> None:
    model = _GatedBlocks()
    with pytest.raises(sharify.UntraceableError) as info:
        sharify.sharify(model)
    message = str(info.value)
    assert "cannot trace `_GatedBlocks.forward`" in message and "`head` analysed" in message
    assert "share a submodule" in message and "example_inputs=" in message and "leaf_modules" not in message


# --- bad example_inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        ("x", TypeError, r"example_inputs is a str \('x'\); pass a tensor"),
        ((1, 3, 32, 32), TypeError, r"example_inputs is a shape \(1, 3, 32, 32\), not a tensor; pass torch\.randn"),
        ((torch.randn(1, 3, 32, 32), 5), TypeError, r"example_inputs\[1\] is a int"),
        ({"x": torch.randn(1, 3, 32, 32)}, TypeError, r"example_inputs is a dict"),
        ([torch.randn(1, 3, 32, 32), "y"], TypeError, r"example_inputs\[1\] is a str"),
        ((), ValueError, r"example_inputs is empty"),
        ((torch.randn(1, 3, 32, 32),) * 2, TypeError, r"2 tensors, but OldCifarResNet\.forward takes 1 positional"),
    ],
)
def test_bad_example_inputs_are_refused_clearly(inputs: Any, error: type[Exception], match: str) -> None:
    model = OldCifarResNet()
    with pytest.raises(error, match=match):
        sharify.plan(model, example_inputs=inputs)
    with pytest.raises(error, match=match):
        sharify.sharify(model, example_inputs=inputs, inplace=True)
    assert not hasattr(model, "sharify_shared")


def test_what_a_forward_caches_on_its_modules_does_not_outlive_the_trace() -> None:
    # A trace runs the forward with proxies: an attribute or dict entry it caches (MultiScaleRoIAlign's scales,
    # LeViT's attention biases) would make the model's next forward, or the next analysis, compute with them.
    model = CachingNet()
    plan = sharify.plan(model)
    assert len(plan.groups) == 1 and sharify.plan(model).groups == plan.groups  # a second analysis sees the same
    assert all(b.scale is None and b.bias_cache == {} for b in model.blocks)
    shared = sharify.sharify(model)
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(model(x)).all() and shared(x).shape == (2, 8)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_tensor_the_forward_creates_is_kept_by_the_graph_not_left_on_the_model(device: str) -> None:
    # torch.fx stores torch.tensor([...]) of a forward as the root's `_tensor_constant0`; the trace must not add
    # it to the user's model, and shape propagation still needs its value (timm's csatv2 on the meta device).
    with torch.device(device):
        model = ConstantStemNet()
    attributes = set(model.__dict__)
    plan = sharify.plan(model)
    assert len(plan.groups) == 1 and not plan.notes, plan.notes
    assert set(model.__dict__) == attributes and not hasattr(model, "_tensor_constant0")
    if device == "cpu":
        shared = sharify.sharify(model)
        assert not hasattr(shared, "_tensor_constant0")
        assert shared(torch.randn(2, 3, 16, 16)).shape == (2, 8)
