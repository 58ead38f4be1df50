"""Relaxed sharing: members with low-rank deltas (``delta_rank``, ``param_budget``).

The parameter arithmetic is checked against counts made here by hand (``r * (out + in/groups * kh * kw)`` per
member, ``+ out`` with a bias), over random nets with grouped convs; ``delta_rank="full"`` must reproduce the
original model; the weight error must fall with the rank; a budget is never exceeded; and the deltas survive
save/load, unshare, load_unshared_state_dict, verify/retie and training.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sharify
from tests.conftest import perturb
from tests.nets import NormFreeNet, RandomNet, TinyNet, cifar_resnet
from tests.planning.test_properties import net_specs
from tests.rewrite.test_wrappers import process_group as process_group  # the fixture


class GroupedBlock(nn.Module):
    """ResNeXt-style: 1x1 -> grouped kxk (the shared position) -> 1x1, BatchNorm after each, added to the input."""

    def __init__(self, width: int, mid: int, groups: int, kernel: int, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel, padding=kernel // 2, groups=groups, bias=bias)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.conv3(F.relu(self.bn2(self.conv2(y)))))


class GroupedNet(nn.Module):
    def __init__(self, width: int, mid: int, groups: int, kernel: int, bias: bool, depth: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*(GroupedBlock(width, mid, groups, kernel, bias) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


X = torch.randn(2, 3, 8, 8)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def delta_by_hand(conv: nn.Conv2d, rank: int) -> int:
    out = conv.out_channels
    row = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    r = min(rank, out, row)
    return r * (out + row) + (out if conv.bias is not None and r else 0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mid=st.sampled_from([4, 8, 12]),
    groups=st.sampled_from([1, 2, 4]),
    kernel=st.sampled_from([1, 3]),
    bias=st.booleans(),
    depth=st.integers(2, 4),
    rank=st.one_of(st.integers(0, 40), st.just("full")),
)
def test_delta_parameters_are_counted_exactly_on_grouped_convs(mid, groups, kernel, bias, depth, rank) -> None:
    net = GroupedNet(8, mid, groups, kernel, bias, depth).eval()
    positions = ("last_spatial",) if kernel == 3 else (1,)
    options = {"example_inputs": X, "positions": positions, "delta_rank": rank, "depthwise": True}
    plan = sharify.plan(net, **options)
    shared = sharify.sharify(net, **options)
    convs = [b.conv2 for b in net.blocks]
    big = max(mid, mid // groups * kernel * kernel)
    per_member = delta_by_hand(convs[0], big if rank == "full" else rank)
    shared_numel = sum(p.numel() for p in convs[0].parameters())
    expected = n_params(net) - depth * shared_numel + shared_numel + depth * per_member
    assert plan.params_after == expected == n_params(shared)
    assert sharify.report(net, shared).params_after == expected
    assert [g.member_size for g in plan.groups] == [per_member]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs, rank=st.integers(1, 6))
def test_random_nets_plan_counts_what_the_rewrite_makes(spec, rank) -> None:
    net = RandomNet(spec).eval()
    x = torch.randn(2, 3, 16, 16)
    plan = sharify.plan(net, example_inputs=x, delta_rank=rank)
    if not plan.groups:
        return
    shared = sharify.sharify(net, example_inputs=x, delta_rank=rank)
    assert n_params(shared) == plan.params_after
    assert all(g.delta_rank == min(rank, g.max_delta_rank) for g in plan.groups)
    out = shared(x)
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in shared.named_parameters() if "delta" in n)


@pytest.mark.parametrize(
    "options",
    [{}, {"init": "scaled"}, {"init": "first"}, {"init": "scaled", "align": True}, {"init": "average", "align": True}],
)
def test_full_rank_reproduces_the_original(options) -> None:
    net = perturb(cifar_resnet(20)).eval()
    x = torch.randn(2, 3, 32, 32)
    shared = sharify.sharify(net, delta_rank="full", **options).eval()
    torch.testing.assert_close(shared(x), net(x), rtol=1e-4, atol=1e-5)
    assert all(g.delta_rank == g.max_delta_rank for g in sharify.plan(net, delta_rank="full").groups)


def test_full_rank_reproduces_biased_convs() -> None:
    net = perturb(NormFreeNet()).eval()
    shared = sharify.sharify(net, delta_rank="full").eval()
    expected = net(X)  # no normalisation: outputs of ~1e6, so float32 rounding of the factors is relative to that
    torch.testing.assert_close(shared(X), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    member = shared.blocks[0].conv2
    assert member.delta_bias.shape == (8,)
    assert not hasattr(member, "weight_orig")


def test_the_weight_error_falls_with_the_rank() -> None:
    net = perturb(cifar_resnet(20)).eval()
    errors, captured = [], []
    for rank in (0, 1, 2, 4, 8, 16, "full"):
        report = sharify.report(net, sharify.sharify(net, delta_rank=rank, init="scaled"))
        errors.append([g.dissimilarity for g in report.groups])
        captured.append([min(g.delta_captured or (0.0,)) for g in report.groups])
    for before, after in itertools.pairwise(errors):
        assert all(b >= a - 1e-6 for b, a in zip(before, after)), errors
    for before, after in itertools.pairwise(captured):
        assert all(b <= a + 1e-6 for b, a in zip(before, after)), captured
    assert all(e < 1e-5 for e in errors[-1]) and all(c > 1 - 1e-6 for c in captured[-1])


@pytest.mark.parametrize("budget", [0.8, 0.85, 0.9, 0.95, 1.0])
def test_a_budget_is_respected_and_spent(budget) -> None:
    net = perturb(cifar_resnet(20)).eval()
    shared = sharify.sharify(net, param_budget=budget, init="scaled")
    before, after = n_params(net), n_params(shared)
    assert after <= budget * before
    full = sharify.plan(net).params_after
    groups = sharify.report(net, shared).groups
    biggest_step = max(len(g.members) * (g.shape[0] + g.size // g.shape[0]) for g in groups)
    # spent up to one rank step of some group, unless every group reached the rank where not sharing is cheaper
    capped = all(g.params_after >= g.params_before - len(g.members) * (g.shape[0] + g.size // g.shape[0])
                 for g in groups)  # fmt: skip
    assert capped or after > budget * before - biggest_step
    assert after >= full
    recorded = shared.sharify_shared.options
    assert recorded["param_budget"] is None
    assert recorded["delta_rank"] == {g.key: g.delta_rank for g in groups if g.delta_rank}


def test_a_budget_below_full_sharing_names_the_smallest_possible() -> None:
    net = cifar_resnet(20)
    full = sharify.plan(net).params_after / n_params(net)
    with pytest.raises(ValueError, match=r"smallest possible budget here is 0\.\d+") as info:
        sharify.sharify(net, param_budget=full - 0.01)
    smallest = float(info.value.args[0].split("smallest possible budget here is ")[1].split(" ")[0])
    assert smallest >= full
    sharify.sharify(net, param_budget=smallest)  # the figure named works


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"delta_rank": -1}, ValueError, "int >= 0"),
        ({"delta_rank": 1.5}, TypeError, "delta_rank must be"),
        ({"delta_rank": True}, TypeError, "delta_rank must be"),
        ({"delta_rank": "half"}, TypeError, "delta_rank must be"),
        ({"param_budget": 0.0}, ValueError, r"in \(0, 1\]"),
        ({"param_budget": 1.5}, ValueError, r"in \(0, 1\]"),
        ({"param_budget": 70}, ValueError, r"for 70 % pass param_budget=0\.7"),
        ({"param_budget": "0.7"}, TypeError, "param_budget must be"),
        ({"param_budget": 0.9, "delta_rank": 2}, ValueError, "not both"),
        ({"method": "basis", "shared_rank": 8, "unique_rank": 1, "delta_rank": 2}, ValueError, "method='share'"),
        ({"delta_rank": {"nowhere": 2}}, ValueError, "neither stage paths nor group keys"),
    ],
)
def test_bad_relaxed_options_are_refused_before_anything_changes(options, error, match) -> None:
    net = TinyNet()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(error, match=match):
        sharify.sharify(net, inplace=True, **options)
    assert not any(sharify.layers.is_shared_conv(m) for m in net.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_the_report_shows_each_groups_rank_and_what_its_deltas_capture() -> None:
    net = perturb(TinyNet())
    text = str(sharify.report(net, sharify.sharify(net, delta_rank={"layer1": 2})))
    assert "delta rank: captured" in text
    row = next(line for line in text.splitlines() if line.startswith("layer1.conv2 "))
    assert row.split()[-3] == "2:" and all(c.endswith("%") for c in row.split()[-2:])
    assert next(line for line in text.splitlines() if line.startswith("layer2.conv2 ")).split()[-1] == "-"
    plain = str(sharify.report(net, sharify.sharify(net)))
    assert "delta rank" not in plain


def test_rank_mapping_by_stage_and_by_group_key() -> None:
    net = TinyNet()
    plan = sharify.plan(net, delta_rank={"layer1": 2, "layer2.conv2": "full"})
    assert {g.key: g.delta_rank for g in plan.groups} == {"layer1.conv2": 2, "layer2.conv2": 16}


def test_save_load_unshare_and_verify_keep_the_deltas(tmp_path: Path) -> None:
    net = perturb(TinyNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    shared = sharify.sharify(net, param_budget=0.9, init="scaled", align=True).eval()
    with torch.no_grad():  # trained deltas, not their initial values
        for name, p in shared.named_parameters():
            if "delta" in name:
                p.add_(torch.randn_like(p) * 0.01)
    assert sharify.verify(shared) == []
    path = tmp_path / "relaxed.safetensors"
    sharify.save(shared, path)
    loaded = sharify.load(path, TinyNet()).eval()
    torch.testing.assert_close(loaded(x), shared(x), rtol=0, atol=0)
    plain = sharify.unshare(shared).eval()
    assert list(plain.state_dict()) == list(net.state_dict())
    assert not any("delta" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(x), shared(x), rtol=1e-5, atol=1e-6)


def test_load_unshared_state_dict_refits_the_deltas() -> None:
    original = perturb(TinyNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    made_here = sharify.sharify(original, delta_rank=3).eval()
    other = sharify.sharify(TinyNet(), delta_rank=3).eval()  # other weights, same structure
    sharify.load_unshared_state_dict(other, original.state_dict())
    torch.testing.assert_close(other(x), made_here(x), rtol=1e-5, atol=1e-6)
    full = sharify.sharify(TinyNet(), delta_rank="full").eval()
    sharify.load_unshared_state_dict(full, original.state_dict())
    torch.testing.assert_close(full(x), original(x), rtol=1e-4, atol=1e-5)


def test_deltas_train_and_follow_the_members_trainability() -> None:
    net = TinyNet()
    net.layer2.requires_grad_(False)
    shared = sharify.sharify(net, delta_rank=2, positions=("all_spatial",))  # layer2's groups wholly frozen
    own = {n: p for n, p in shared.named_parameters() if "delta" in n}
    assert own and all(p.requires_grad == n.startswith("layer1") for n, p in own.items())
    shared(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in own.items() if n.startswith("layer1"))


def test_meta_device_models_get_delta_shapes_and_a_budget_is_refused() -> None:
    with torch.device("meta"):
        net = TinyNet()
    shared = sharify.sharify(net, delta_rank=2, example_inputs=torch.zeros(1, 3, 16, 16, device="meta"))
    assert shared.layer1[0].conv2.delta_a.shape == (2, 72) and shared.layer1[0].conv2.delta_a.is_meta
    with pytest.raises(ValueError, match="meta device"):
        sharify.sharify(net, param_budget=0.95, example_inputs=torch.zeros(1, 3, 16, 16, device="meta"))


def test_retie_repairs_a_relaxed_model_after_a_copy() -> None:
    shared = sharify.sharify(TinyNet(), delta_rank=2)
    own = shared.layer1[1].conv2.delta_a.detach().clone()
    shared.layer1[1] = copy.deepcopy(shared.layer1[1])  # its member now reads a copy of the holder
    assert "read a copy of shared group `layer1.conv2`" in sharify.verify(shared)[0]
    assert sharify.retie(shared) == ["re-pointed `layer1.1.conv2` to the registered holder `layer1.conv2`"]
    member = shared.layer1[1].conv2
    assert sharify.verify(shared) == [] and member._sharify_holder is shared.sharify_shared.layer1.conv2
    assert member.delta_rank == 2 and torch.equal(member.delta_a, own)  # the member keeps its own delta
    # a reload with assign=True replaces the holder's tensor; members read it and keep their deltas
    shared.load_state_dict({k: v.clone() for k, v in shared.state_dict().items()}, assign=True)
    assert sharify.verify(shared) == [] and member.delta_rank == 2


def test_a_plan_for_a_budget_refuses_to_be_applied_without_weights() -> None:
    plan = sharify.plan(TinyNet(), param_budget=0.95)
    assert any("param_budget=0.95" in n for n in plan.notes)
    with torch.device("meta"):
        meta = TinyNet()
    with pytest.raises(ValueError, match="param_budget chooses the delta ranks from the members' weights"):
        sharify.apply_plan(meta, plan)
    assert not any(sharify.layers.is_shared_conv(m) for m in meta.modules())


def test_ddp_compile_and_ema_train_the_deltas(process_group) -> None:
    """The wrappers a training codebase adds: one DDP step moves the shared weight and every delta; a compiled
    relaxed model computes what the eager one does; timm's EMA averages the deltas too."""
    from timm.utils import ModelEmaV3

    shared = sharify.sharify(TinyNet(), delta_rank=2)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(torch.compile(shared)(x), shared(x), rtol=1e-4, atol=1e-5)
    ema = ModelEmaV3(shared, decay=0.5)
    ddp = nn.parallel.DistributedDataParallel(shared)
    before = {n: p.detach().clone() for n, p in shared.named_parameters()}
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ddp(x).square().mean().backward()
    opt.step()
    moved = [n for n, p in shared.named_parameters() if not torch.equal(before[n], p)]
    assert "sharify_shared.layer1.conv2.weight" in moved and all(
        n in moved for n in before if n.endswith(("delta_a", "delta_b"))
    )
    assert sharify.verify(ddp) == []
    ema.update(shared)
    member = ema.module.layer1[1].conv2
    torch.testing.assert_close(
        member.delta_a, 0.5 * before["layer1.1.conv2.delta_a"] + 0.5 * shared.layer1[1].conv2.delta_a
    )


def test_a_budget_on_a_transformers_resnet_round_trips(tmp_path: Path) -> None:
    """Model code nobody here wrote: a Hugging Face ResNet keeps its class, spends the budget, and loads back."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[3, 3], layer_type="basic", num_labels=4)
    original = perturb(ResNetForImageClassification(config)).eval()
    shared = sharify.sharify(original, param_budget=0.9, init="scaled", align=True).eval()
    assert type(shared) is ResNetForImageClassification
    assert n_params(shared) <= 0.9 * n_params(original) and any(shared.sharify_shared.options["delta_rank"].values())
    x = torch.randn(2, 3, 32, 32)
    loaded = sharify.load(sharify.save(shared, tmp_path / "hf.safetensors"), ResNetForImageClassification(config))
    torch.testing.assert_close(loaded.eval()(x).logits, shared(x).logits, rtol=0, atol=0)
    exact = sharify.sharify(original, delta_rank="full").eval()
    torch.testing.assert_close(exact(x).logits, original(x).logits, rtol=1e-4, atol=1e-5)


def test_cached_weights_compute_each_members_sum_once_and_give_the_same_outputs() -> None:
    model = sharify.sharify(cifar_resnet(14, width=8).eval(), positions=("all_spatial",), delta_rank=2)
    members = [m for m in model.modules() if sharify.is_shared_conv(m) and m.delta_rank]
    assert members
    x = torch.randn(2, 3, 16, 16)
    calls = 0
    real = torch.addmm

    def counting_addmm(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    with torch.no_grad():
        expected = model(x)
        torch.addmm = counting_addmm  # type: ignore[assignment]
        try:
            with sharify.cached_weights(model):
                outputs = [model(x) for _ in range(3)]
        finally:
            torch.addmm = real
    assert calls == len(members)  # once per member, not once per member and forward
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    members[0].weight  # noqa: B018  # outside the context: computed again, from the current tensors
    with torch.no_grad():
        members[0].delta_b.add_(1.0)
    assert not torch.equal(model(x), expected)  # a change after the context is seen


def test_cached_weights_leave_copies_and_other_models_alone_and_refuse_non_modules() -> None:
    model = sharify.sharify(cifar_resnet(14, width=8).eval(), positions=("all_spatial",), delta_rank=2)
    with sharify.cached_weights(model):
        inner = copy.deepcopy(model)
        member = next(m for m in inner.modules() if sharify.is_shared_conv(m) and m.delta_rank)
        first = member.weight
        with torch.no_grad():
            member.delta_b.add_(1.0)
        assert not torch.equal(member.weight, first)  # the copy is not cached: it sees its own update
        with sharify.cached_weights(model):  # nested: the outer context keeps its cache
            pass
        outer = next(m for m in model.modules() if sharify.is_shared_conv(m) and m.delta_rank)
        assert outer.weight is outer.weight
    assert outer.weight is not outer.weight
    with pytest.raises(TypeError, match=r"cached_weights expects a torch\.nn\.Module"), sharify.cached_weights("x"):  # type: ignore[arg-type]
        pass
