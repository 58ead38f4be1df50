"""Analysis is structural and cheap (issue 2, Behaviour 1): traced with torch.fx, shapes propagated on fake
tensors from default inputs the model itself suggests, and a clear error when the stages cannot be traced."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import sharify
from tests.conftest import state_equal

# --- untraceable stages ----------------------------------------------------------------------------


# The nets of this file are defined here, not in tests/nets.py: each is the code pattern its tests are about
# (root code torch.fx cannot trace, a head inlined in the root's forward, a head registered before the stem).


class _GatedNet(nn.Module):
    """Residual blocks looped in the root's forward behind a data-dependent gate: torch.fx cannot trace
    the code that chains the blocks, so there is no data flow to find stages in."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)) for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            if x.mean() > 0:  # data-dependent control flow
                x = x + block(x)
        return x


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _GatedNet()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def test_untraceable_stages_in_the_root_forward_raise_a_clear_error() -> None:
    model = _GatedNet()
    before = copy.deepcopy(model)
    # The root's own code: leaf_modules cannot help, so the refusal names what can (and what was tried).
    match = r"cannot trace `_GatedNet\.forward` \(TraceError: .*control flow\).*`blocks\.0` analysed.*share a submodule"
    with pytest.raises(sharify.UntraceableError, match=match):
        sharify.plan(model)
    with pytest.raises(sharify.UntraceableError, match=match):
        sharify.sharify(model, inplace=True)
    assert state_equal(model, before) and not any(sharify.is_shared_conv(m) for m in model.modules())


def test_untraceable_submodule_holding_the_stages_is_named_in_the_refusal() -> None:
    # Below the root the untraceable module is leafed automatically; with the stages inside it nothing is
    # left to share, and the refusal says which module was not analysed.
    model = _Wrapped()
    plan = sharify.plan(model)
    assert list(plan.auto_leaves) == ["body"] and "control flow" in plan.auto_leaves["body"]
    text = str(plan).splitlines()
    assert len(text) == 2 and text[1].startswith("  nothing to share: no residual blocks found in _Wrapped")
    assert f"could not be traced and were not analysed: `body` ({plan.auto_leaves['body']})" in text[1]
    with pytest.raises(sharify.SharifyError, match=r"could not be traced and were not analysed: `body` \(TraceError"):
        sharify.sharify(model)


def _block(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))  # fmt: skip


class _InlineHeadNet(nn.Module):
    """Stages torch.fx can trace, then data-dependent control flow written in the root's own forward (no
    submodule to leaf): the trace stops there, and what it traced before is analysed."""

    def __init__(self, late_stage: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(_block(8) for _ in range(3))
        self.late = nn.ModuleList(_block(8) for _ in range(2)) if late_stage else nn.ModuleList()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        if x.abs().amax() > 1:  # data-dependent control flow
            x = x / x.abs().amax()
        for block in self.late:
            x = x + block(x)
        return self.fc(x.mean((2, 3)))


def test_data_dependent_control_flow_in_the_root_forward_after_the_stages() -> None:
    model = _InlineHeadNet()
    plan = sharify.plan(model, example_inputs=torch.randn(1, 3, 16, 16))
    assert [g.members for g in plan.groups] == [("blocks.0.3", "blocks.1.3", "blocks.2.3")]
    assert plan.params_saved == 2 * 8 * 8 * 9
    assert plan.trace_stopped is not None and plan.trace_stopped.startswith("`_InlineHeadNet.forward` (TraceError")
    assert any(n.startswith("torch.fx could not trace `_InlineHeadNet.forward`") for n in plan.notes)
    with pytest.warns(UserWarning, match=r"could not trace `_InlineHeadNet\.forward`.*blocks the forward runs after"):
        shared = sharify.sharify(model)
    assert sharify.report(model, shared).params_after == plan.params_after
    x = torch.randn(2, 3, 16, 16)
    assert shared(x).shape == model(x).shape == (2, 10)


def test_blocks_after_the_untraceable_root_code_are_left_alone() -> None:
    model = _InlineHeadNet(late_stage=True)
    with pytest.warns(UserWarning, match="could not trace"):
        shared = sharify.sharify(model)
    members = {p for _, (_, paths) in sharify.shared_groups(shared).items() for p in paths}
    assert members == {"blocks.0.3", "blocks.1.3", "blocks.2.3"}  # `late` runs after the stop: not analysed
    assert not any(sharify.is_shared_conv(m) for m in shared.late.modules())


def test_example_inputs_are_checked_against_the_first_conv_the_forward_calls() -> None:
    class HeadRegisteredFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = nn.Conv2d(16, 10, 1)  # registered before the stem, called last
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.blocks = nn.ModuleList(_block(16) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            for block in self.blocks:
                x = torch.relu(x + block(x))
            return self.classifier(x).mean((2, 3))

    model = HeadRegisteredFirst()
    assert sharify.plan(model, example_inputs=torch.randn(1, 3, 32, 32)).params_saved == 2 * 16 * 16 * 9
    assert sharify.plan(model).input_shapes == ((1, 3, 224, 224),)
    with pytest.raises(sharify.ExampleInputsError, match=r"16 channels .* first conv `stem` expects 3"):
        sharify.plan(model, example_inputs=torch.randn(1, 16, 32, 32))


def test_example_inputs_reaching_the_first_conv_through_a_space_to_depth_stem() -> None:
    # tresnet's stem turns (N, 3, H, W) into (N, 48, H/4, W/4) before its first conv
    with torch.device("meta"):
        model = timm.create_model("tresnet_m")
    assert model.body[1].conv.in_channels == 48
    assert sharify.plan(model, example_inputs=torch.randn(1, 3, 224, 224)).groups


# --- no real convolution, no real activation -------------------------------------------------------


_CONVOLUTIONS = frozenset({"convolution", "_convolution", "conv2d", "mkldnn_convolution", "cudnn_convolution"})


class _TensorSpy(TorchDispatchMode):
    """Records every convolution dispatched (with whether its input was real) and every real tensor an op
    returned."""

    def __init__(self) -> None:
        super().__init__()
        self.convolutions: list[bool] = []  # True: a real (not fake, not meta) input
        self.real_shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _CONVOLUTIONS:
            self.convolutions.append(_is_real(args[0]))
        for t in torch.utils._pytree.tree_leaves(out):
            if _is_real(t):
                self.real_shapes.add(tuple(t.shape))
        return out


def _is_real(t: object) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and not t.is_meta


@contextmanager
def _spy() -> Iterator[_TensorSpy]:
    with _TensorSpy() as spy:
        yield spy


@pytest.mark.parametrize(
    "build",
    [
        torchvision.models.resnet18,  # plain convs: their output shape follows a formula, no dispatch at all
        lambda: timm.create_model("resnetv2_50x1_bit"),  # StdConv2d: its own forward runs, on fake tensors
    ],
    ids=["torchvision:resnet18", "timm:resnetv2_50x1_bit"],
)
def test_analysis_runs_no_real_convolution_and_allocates_no_activation(build: Any) -> None:
    model = build()  # real (randomly initialised) weights
    weight_shapes = {tuple(t.shape) for t in [*model.parameters(), *model.buffers()]}
    with _spy() as spy:
        plan = sharify.plan(model)
        shared = sharify.sharify(model)
        result = sharify.report(model, shared)
    assert plan.groups and result.params_after == plan.params_after
    assert not any(spy.convolutions), f"{sum(spy.convolutions)} convolutions ran on real tensors"
    if any(type(m).forward is not nn.Conv2d.forward for m in model.modules() if isinstance(m, nn.Conv2d)):
        assert spy.convolutions  # the spy sees the fake convolutions of StdConv2d: it is not blind
    # Real tensors are made only as copies of weights (the shared init, deepcopy); an activation (N, ...)
    # would have a shape no parameter or buffer has.
    activations = {s for s in spy.real_shapes if len(s) >= 2 and s not in weight_shapes}
    assert not activations, activations

    with _spy() as control:  # the spy does see a real forward
        model.eval()(torch.randn(1, 3, 32, 32))
    assert control.convolutions and all(control.convolutions)


# --- default example inputs ------------------------------------------------------------------------


def test_default_input_size_comes_from_timm_pretrained_cfg_and_channels_from_the_first_conv() -> None:
    with torch.device("meta"):
        model = timm.create_model("resnet26t", in_chans=1)
    assert model.pretrained_cfg["input_size"] == (3, 256, 256)  # the cfg keeps the pretrained channels
    plan = sharify.plan(model)
    assert plan.input_shapes == ((1, 1, 256, 256),) and plan.groups
    assert sharify.plan(timm.create_model("test_resnet")).input_shapes == ((1, 3, 160, 160),)


def test_default_input_without_a_timm_cfg_is_224_px() -> None:
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # a grey-scale input
    assert sharify.plan(model).input_shapes == ((1, 1, 224, 224),)
