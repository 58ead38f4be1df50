"""Regression tests for structures met in the torchvision/timm zoo sweep (benchmarks/coverage.py).

Each test is a tiny hand-written module reproducing the structure that once failed or misbehaved, so the
fix is checked without building zoo models. The modules stay next to their tests (each one's structure is what
its test is about); the plain residual block several of them chain is :class:`tests.nets.BasicBlock`.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import sharify
from tests.nets import BasicBlock


class _LayerScaleNet(nn.Module):
    """Parameters read in forward (layer scale, a tied scale registered under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(BasicBlock(8) for _ in range(3))
        self.gammas = nn.ParameterList(nn.Parameter(torch.full((8, 1, 1), 0.1)) for _ in range(3))
        self.tied = self.gammas[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, gamma in zip(self.blocks, self.gammas, strict=True):
            x = x + (block(x) - x) * gamma * self.tied
        return x


def test_parameters_read_in_forward_trace_to_the_same_get_attr_nodes_as_fx() -> None:
    # The tracer looks parameter paths up in a map instead of fx's scan of named_parameters().
    from torch import fx

    from sharify.analysis.tracing import trace

    model = _LayerScaleNet()
    ours = [n.target for n in trace(model).graph.nodes if n.op == "get_attr"]
    theirs = [n.target for n in fx.Tracer().trace(model).nodes if n.op == "get_attr"]
    # A tied parameter gets one node, named by its first path in named_parameters() (the root's own first).
    assert ours == theirs == ["gammas.0", "tied", "gammas.2"]


class _FixedSizeHead(nn.Module):
    """Residual stages followed by a head that only accepts 8x8 feature maps (flatten + Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(8), BasicBlock(8), BasicBlock(8))
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.blocks(self.stem(x)), 1))


def test_head_after_the_last_stage_is_not_shape_propagated() -> None:
    # The default analysis input is 224 px, which the head rejects; the stages do not care.
    model = _FixedSizeHead()
    plan = sharify.plan(model)
    assert [g.members for g in plan.groups] == [("blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2")]
    assert plan.notes == ()  # the head is never run, so no "shape propagation stopped" note
    shared = sharify.sharify(model)
    assert sharify.report(model, shared).params_after == plan.params_after
    assert shared(torch.randn(2, 3, 8, 8)).shape == (2, 10)


class _DataDependentMixer(nn.Module):
    """A transformer-like block whose forward cannot run on fake tensors (data-dependent shape)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.nonzero(x[0, :, 0] > 0).shape[0]  # data-dependent: unknown to fake tensors
        return x + self.fc(x) * keep


class _PatchTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.Sequential(_DataDependentMixer(16), _DataDependentMixer(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.patch(x).flatten(2).transpose(1, 2))


def test_linear_blocks_whose_shapes_cannot_be_propagated_are_refused_naming_the_op() -> None:
    # Its adds have a Linear on one side, so they are candidate blocks whose shapes are needed; fake tensors
    # cannot run the data-dependent nonzero: the refusal names it instead of claiming there are no blocks.
    model = _PatchTransformer()
    plan = sharify.plan(model, positions=("all_linear",))
    assert plan.groups == () and plan.stages == ()
    assert len(plan.notes) == 1 and "stopped at `nonzero` (module `blocks.0`)" in plan.notes[0]
    with pytest.raises(sharify.NothingToShareError, match=r"(?s)no residual blocks found.*stopped at `nonzero`"):
        sharify.sharify(model)


def _plan_summary(plan: sharify.SharingPlan) -> tuple:
    return plan.params_after, [(g.key, g.members) for g in plan.groups], [(s.path, s.shape) for s in plan.stages]


def test_meta_device_model_plans_like_the_real_one() -> None:
    # Models built on the meta device are propagated on meta tensors (no fake-tensor dispatch).
    import torchvision

    real = torchvision.models.resnet18()
    with torch.device("meta"):
        meta = torchvision.models.resnet18()
    assert _plan_summary(sharify.plan(meta)) == _plan_summary(sharify.plan(real))
    assert sharify.report(meta, sharify.sharify(meta)).params_after == sharify.plan(real).params_after


class _CopiesToCpu(_FixedSizeHead):
    """A forward meta tensors cannot run (a round trip through the CPU); fake tensors can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.fc(torch.flatten(self.blocks(x.cpu().to(x.device)), 1))


def test_meta_model_that_meta_tensors_cannot_run_falls_back_to_fake_tensors(caplog: pytest.LogCaptureFixture) -> None:
    with torch.device("meta"):
        meta = _CopiesToCpu()
    with caplog.at_level(logging.DEBUG, logger="sharify.analysis.shapes"):
        plan = sharify.plan(meta)
    assert "retrying with fake tensors" in caplog.text
    assert _plan_summary(plan) == _plan_summary(sharify.plan(_CopiesToCpu()))
    assert len(plan.groups) == 1


class _UntraceableMixer(nn.Module):
    """A conv-free transformer whose root forward has data-dependent control flow (not traceable)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if x.sum() > 0:
                x = x + block(x)
        return x


class _NoLayers(nn.Module):
    """Nothing sharify shares (no conv, no Linear), and a forward torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if x.sum() > 0 else x


def test_model_without_convs_or_linears_is_refused_without_tracing() -> None:
    model = _NoLayers()
    assert sharify.plan(model).groups == ()
    with pytest.raises(sharify.NothingToShareError, match=r"no residual blocks found.*has no Conv2d or Linear layers"):
        sharify.sharify(model)


def test_untraceable_linear_model_is_refused_naming_the_control_flow() -> None:
    with pytest.raises(sharify.UntraceableError, match=r"cannot trace `_UntraceableMixer.forward` \(TraceError"):
        sharify.sharify(_UntraceableMixer(), example_inputs=torch.randn(2, 4, 8))


class _PoolMixerBlock(nn.Module):
    """PoolFormer/MetaFormer-style block: pooling token mixer, then a pointwise-conv MLP."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.fc1 = nn.Conv2d(c, 2 * c, 1)
        self.fc2 = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (self.pool(x) - x)
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_pointwise_only_branches_are_refused_with_the_position_that_shares_them() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _PoolMixerBlock(8), _PoolMixerBlock(8))
    with pytest.raises(sharify.NothingToShareError, match=r"only pointwise \(1x1\) convs.*positions=\['last'\]"):
        sharify.sharify(model)
    plan = sharify.plan(model, positions="last")
    assert [g.members for g in plan.groups] == [("1.fc2", "2.fc2")]


class _ReusedConvNet(nn.Module):
    """CoaT-style: one conv module applied in every block (its weight is already shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(8, 8, 3, padding=1)
        self.mlps = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for mlp in self.mlps:
            x = x + self.pos(x)
            x = x + mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


def test_convs_reused_across_blocks_are_refused_as_already_shared() -> None:
    with pytest.raises(sharify.NothingToShareError, match="called more than once per forward"):
        sharify.sharify(_ReusedConvNet())


class _CachingAttention(nn.Module):
    """ConViT-style: the forward computes a tensor from the input's size and keeps it in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache.shape[0] != x.shape[1]:
            self.cache = torch.ones(x.shape[1], device=x.device)
        return x * self.cache[:, None]


class _CachingViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.ModuleList(_CachingAttention() for _ in range(2))
        self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        for attn, fc in zip(self.attn, self.fc):
            x = x + fc(attn(x))
        return x


def test_what_a_leaf_caches_during_shape_propagation_does_not_outlive_the_analysis() -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    model = _CachingViT()
    shared = sharify.sharify(model, positions=("mlp",), leaf_modules=[_CachingAttention])  # forwards run on fakes
    for m in (model, shared):
        assert not any(isinstance(b, FakeTensor) for b in m.buffers())
    x = torch.randn(2, 3, 16, 16)
    shared(x).sum().backward()  # a fake buffer left behind would make this fail (or the gradient fake)
    assert not isinstance(next(iter(sharify.shared_groups(shared).values()))[0].weight.grad, FakeTensor)
