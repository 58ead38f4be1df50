"""sharify's options and guarantees: init strategies, inplace and transactional rewrite, original
checkpoints, and clear errors for bad input (issue 2, Behaviour 4-6)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import sharify
from sharify import layers
from tests.conftest import state_equal
from tests.nets import PlainNet, cifar_resnet

X32 = torch.randn(1, 3, 32, 32)


def _members(model: nn.Module, key: str) -> list[nn.Module]:
    return [model.get_submodule(p) for p in sharify.shared_groups(model)[key][1]]


@pytest.mark.parametrize("init", ["average", "first", "random"])
def test_init_strategies(init: str) -> None:
    model = cifar_resnet(20)
    shared = sharify.sharify(model, example_inputs=X32, init=init)
    weights = [model.layer2[i].conv2.weight for i in (0, 1, 2)]  # the stride is on conv1: conv2 of block 0 too
    assert sharify.shared_groups(shared)["layer2.conv2"][1] == ["layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"]
    value = shared.sharify_shared.layer2.conv2.weight
    if init == "average":
        torch.testing.assert_close(value, sum(weights) / 3)
    elif init == "first":
        assert torch.equal(value, weights[0])
    else:
        assert not any(torch.equal(value, w) for w in weights)
        bound = 1 / (32 * 9) ** 0.5  # kaiming_uniform(a=sqrt(5)) of nn.Conv2d: U(-1/sqrt(fan_in), ...)
        assert value.abs().max() <= bound and value.std() > bound / 3
    assert shared.sharify_shared.options["init"] == init


def test_unknown_init_is_a_value_error_and_model_untouched() -> None:
    model = cifar_resnet(20)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"unknown init 'mean'.*'average'"):
        sharify.sharify(model, example_inputs=X32, init="mean", inplace=True)
    assert state_equal(model, before)


def test_default_leaves_caller_model_untouched() -> None:
    model = cifar_resnet(20).train()
    before = copy.deepcopy(model)
    ids = [id(p) for p in model.parameters()]
    shared = sharify.sharify(model, example_inputs=X32)
    assert shared is not model
    assert state_equal(model, before) and [id(p) for p in model.parameters()] == ids
    assert type(model.layer1[0].conv2) is nn.Conv2d and not hasattr(model, layers.SHARED_STORE_NAME)
    assert model.training and all(m.training for m in model.modules())


def test_inplace_rewrites_the_model_itself_and_keeps_references() -> None:
    model = cifar_resnet(20)
    conv = model.layer1[1].conv2
    hooked = []
    conv.register_forward_hook(lambda m, i, o: hooked.append(o.shape))
    shared = sharify.sharify(model, example_inputs=X32, inplace=True)
    assert shared is model and model.layer1[1].conv2 is conv and sharify.is_shared_conv(conv)
    model(X32)
    assert hooked == [torch.Size([1, 16, 32, 32])]


def test_failure_during_rewrite_restores_the_model(monkeypatch) -> None:
    model = cifar_resnet(20)
    before = copy.deepcopy(model)
    calls = {"n": 0}
    real = layers.attach_to_holder

    def flaky(conv, holder, gain=None, delta=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        real(conv, holder, gain, delta)

    monkeypatch.setattr("sharify.rewrite.apply.attach_to_holder", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        sharify.sharify(model, example_inputs=X32, inplace=True)
    assert calls["n"] == 5
    assert state_equal(model, before)
    assert not any(sharify.is_shared_conv(m) for m in model.modules())
    assert not hasattr(model, layers.SHARED_STORE_NAME)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    assert torch.equal(model.eval()(X32), before.eval()(X32))


def test_load_unshared_checkpoint_folds_members() -> None:
    original = cifar_resnet(20)
    shared = sharify.sharify(cifar_resnet(20), example_inputs=X32, init="random")
    ddp_style = {f"module.{k}": v for k, v in original.state_dict().items()}
    result = sharify.load_unshared_state_dict(shared, ddp_style)
    assert not result.missing_keys and not result.unexpected_keys
    expected = torch.stack([original.layer3[i].conv2.weight for i in (0, 1, 2)]).mean(0)
    torch.testing.assert_close(shared.sharify_shared.layer3.conv2.weight, expected)
    assert torch.equal(shared.layer1[0].conv1.weight, original.layer1[0].conv1.weight)
    sharify.load_unshared_state_dict(shared, original.state_dict(), init="first")
    assert torch.equal(shared.sharify_shared.layer3.conv2.weight, original.layer3[0].conv2.weight)


def test_load_unshared_checkpoint_errors() -> None:
    shared = sharify.sharify(cifar_resnet(20), example_inputs=X32)
    sd = cifar_resnet(20).state_dict()
    del sd["layer2.2.conv2.weight"]
    with pytest.raises(KeyError, match=r"layer2\.2\.conv2\.weight.*layer2\.conv2"):
        sharify.load_unshared_state_dict(shared, sd)
    with pytest.raises(ValueError, match="no shared convs"):
        sharify.load_unshared_state_dict(cifar_resnet(20), sd)


def test_load_unshared_with_pretrained_style_flow_matches_sharify_of_loaded_model() -> None:
    pretrained = torchvision.models.resnet18()
    a = sharify.sharify(pretrained)  # sharify a loaded model ...
    b = sharify.sharify(torchvision.models.resnet18(), init="random")
    sharify.load_unshared_state_dict(b, pretrained.state_dict())  # ... or load into a sharified one
    assert state_equal(a, b)


# --- bad input -----------------------------------------------------------------------------------


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"expects a torch.nn.Module, got dict"):
        sharify.sharify({"weight": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sharify.plan("resnet50")  # type: ignore[arg-type]


def test_torchscript_module_refused() -> None:
    scripted = torch.jit.script(cifar_resnet(20))
    with pytest.raises(sharify.UnsupportedModelError, match=r"TorchScript.*before torch.jit.script"):
        sharify.sharify(scripted)


def test_already_sharified_refused_and_unchanged() -> None:
    shared = sharify.sharify(cifar_resnet(20), example_inputs=X32)
    before = copy.deepcopy(shared)
    with pytest.raises(sharify.AlreadySharifiedError, match=r"already sharified.*unshare"):
        sharify.sharify(shared, inplace=True)
    assert state_equal(shared, before)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (torch.randn(1, 1, 32, 32), "1 channels .* first conv `conv1` expects 3"),
        (torch.randn(3, 32), r"rank 2.*\(N, C, H, W\)"),
    ],
)
def test_bad_example_inputs(inputs: torch.Tensor, match: str) -> None:
    model = cifar_resnet(20)
    before = copy.deepcopy(model)
    with pytest.raises(sharify.ExampleInputsError, match=match):
        sharify.sharify(model, example_inputs=inputs, inplace=True)
    assert isinstance(sharify.ExampleInputsError("x"), ValueError)
    assert state_equal(model, before)


def test_example_inputs_must_be_tensors() -> None:
    with pytest.raises(TypeError, match=r"example_inputs\[0\] is a list"):
        sharify.plan(cifar_resnet(20), example_inputs=([1, 2],))  # type: ignore[arg-type]


def test_no_residual_blocks() -> None:
    model = PlainNet()
    before = copy.deepcopy(model)
    with pytest.raises(sharify.NothingToShareError, match="no residual blocks found in PlainNet") as info:
        sharify.sharify(model, inplace=True, example_inputs=torch.randn(1, 3, 8, 8))
    assert "pass example_inputs= it accepts (analysed with (1, 3, 8, 8)) and leaf_modules=" in str(info.value)
    assert "nothing ShaResNet-style to share" in str(info.value)
    assert state_equal(model, before)
    assert issubclass(sharify.NothingToShareError, sharify.SharifyError)


def test_residual_blocks_but_nothing_with_same_signature() -> None:
    model = torchvision.models.mobilenet_v2()
    with pytest.raises(sharify.NothingToShareError, match=r"no two convs .* same signature.*depthwise=True"):
        sharify.sharify(model)
    p = sharify.plan(model, depthwise=True)
    assert p.groups and all(g.signature.groups == g.signature.in_channels for g in p.groups)


def test_hints_suggest_only_options_that_share() -> None:
    """timm's pruned EfficientNets hold depthwise convs, but their channel counts differ from block to block:
    depthwise=True would share nothing either, so the refusal must not suggest it."""
    with torch.device("meta"):
        model = timm.create_model("efficientnet_b1_pruned")
    reason = sharify.plan(model).empty_reason()
    assert "depthwise=True" not in reason and "nothing ShaResNet-style to share" in reason
    assert not sharify.plan(model, depthwise=True).groups and not sharify.plan(model, positions="last").groups
    # where depthwise=True does share, it is suggested (and it does share)
    mobilenet = torchvision.models.mobilenet_v2()
    assert "only shared with depthwise=True" in sharify.plan(mobilenet).empty_reason()
    assert sharify.plan(mobilenet, depthwise=True).groups


def test_one_block_stages() -> None:
    model = torchvision.models.resnet18()
    model.layer1, model.layer2 = model.layer1[:1], model.layer2[:1]
    model.layer3, model.layer4 = model.layer3[:1], model.layer4[:1]
    with pytest.raises(
        sharify.NothingToShareError,
        match=r"no stage has two consecutive blocks.*its 4 residual blocks each form a one-block stage.*"
        r"nothing ShaResNet-style to share",
    ):
        sharify.sharify(model)


# Defined here, not in tests/nets.py: blocks whose convs differ in dilation are what the next test is about.
class _TwoConvBlock(nn.Module):
    def __init__(self, dilation: int, first_dilation: int = 1) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=first_dilation, dilation=first_dilation)
        self.b = nn.Conv2d(8, 8, 3, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


def test_nothing_with_same_signature_says_what_to_try() -> None:
    """The last spatial convs differ (dilation) from block to block: the message names the selectors that share."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *(_TwoConvBlock(d) for d in (1, 2, 3)))
    with pytest.raises(
        sharify.NothingToShareError,
        match=r"no two convs picked by positions=\['last_spatial'\] with the same signature in a stage; "
        r"positions='all_spatial' or positions=\(0,\) would share convs of one signature \(e\.g\. `1\.a` and `2\.a`\)",
    ):
        sharify.sharify(model, example_inputs=X32)
    assert len(sharify.plan(model, example_inputs=X32, positions=(0,)).groups) == 1
    # every conv differs: nothing any selector could share
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *(_TwoConvBlock(d, d + 3) for d in (1, 2, 3)))
    with pytest.raises(
        sharify.NothingToShareError,
        match=r"no two blocks of a stage hold convs of one signature at the same position.*nothing ShaResNet-style",
    ):
        sharify.sharify(model, example_inputs=X32)


def test_unknown_position_selector() -> None:
    with pytest.raises(ValueError, match=r"unknown position selector 'middle'.*'last_spatial'"):
        sharify.plan(cifar_resnet(20), positions=("middle",))


def test_wrapped_models_refused() -> None:
    model = cifar_resnet(20)
    with pytest.raises(sharify.UnsupportedModelError, match="sharify the bare model first"):
        sharify.sharify(nn.DataParallel(model))
    with pytest.raises(sharify.UnsupportedModelError, match="OptimizedModule"):
        sharify.sharify(torch.compile(model))


def test_plan_is_a_dry_run_with_readable_output() -> None:
    model = torchvision.models.resnet50()
    before = copy.deepcopy(model)
    p = sharify.plan(model)
    assert state_equal(model, before)
    text = str(p)
    assert "layer3.conv2: 5 x [256->256 3x3 s1x1] saves 2,359,296" in text
    d = p.to_dict()
    assert d["params_after"] == 20_469_800 and len(d["groups"]) == 4 and d["stages"][0]["blocks"][0] == "layer1.0"


# Defined here, not in tests/nets.py: a stem that fails shape propagation is what the next test is about.
class _FailsBeforeTheStages(nn.Module):
    """A stem op that cannot run on the inputs sharify tries (a buffer of the wrong size)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(5, 1, 1))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) * self.scale
        for block in self.body:
            x = x + block(x)
        return x


def test_failed_shape_propagation_is_reported_once_without_torch_log_noise(caplog) -> None:
    with caplog.at_level("DEBUG"):
        p = sharify.plan(_FailsBeforeTheStages())
    assert not [r for r in caplog.records if r.levelno >= 40], "torch's fake-tensor traceback leaked to the log"
    text = str(p)
    assert "shape propagation stopped at `mul`" in p.empty_reason()
    assert text.count("shape propagation stopped at") == 1


@pytest.mark.parametrize("flag", ["skip_first_block", "depthwise", "align"])
def test_flags_must_be_booleans(flag: str) -> None:
    model = cifar_resnet(20)
    before = copy.deepcopy(model)
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'yes'"):
        sharify.sharify(model, inplace=True, **{flag: "yes"})
    assert state_equal(model, before)
