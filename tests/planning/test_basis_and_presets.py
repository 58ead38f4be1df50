"""Filter-basis sharing, the orthogonality regulariser, presets and their bad input (issue 3)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import sharify
from sharify.layers import SHARED_STORE_NAME
from sharify.planning.plan import count_params
from tests.conftest import state_equal
from tests.nets import PreActResNet, cifar_resnet

X = torch.randn(2, 3, 32, 32)
BASIS = {"method": "basis", "positions": ("all_spatial",), "skip_first_block": True}


def _basis(model: nn.Module, **kw) -> nn.Module:
    return sharify.sharify(model, example_inputs=X, **{**BASIS, **kw})


def test_basis_model_shapes_gradients_and_state_dict() -> None:
    model = cifar_resnet(20)
    shared = _basis(model, shared_rank=16, unique_rank=4)
    block = shared.layer2[1].conv1
    assert isinstance(block, sharify.BasisConv2d)
    assert block.shared.weight is shared.layer2[2].conv1.shared.weight
    assert (block.unique.out_channels, block.shared.out_channels, block.coeff.out_channels) == (2, 8, 32)
    shared.train()
    out = shared(X)
    assert out.shape == (2, 10)
    (out.square().mean() + 10 * sharify.orthogonality_loss(shared)).backward()
    assert block.unique.weight.grad is not None and block.coeff.weight.grad is not None
    assert all(h.weight.grad is not None for h, _ in sharify.shared_groups(shared).values())
    keys = [k for k in shared.state_dict() if k.startswith(SHARED_STORE_NAME)]
    assert keys == [f"{SHARED_STORE_NAME}.layer{i}.conv{j}.weight" for i in (1, 2, 3) for j in (1, 2)]
    assert not any(".shared.weight" in k for k in shared.state_dict())
    plan = sharify.plan(model, example_inputs=X, shared_rank=16, unique_rank=4, **BASIS)
    assert sum(p.numel() for p in shared.parameters()) == plan.params_after
    assert sharify.report(model, shared).params_after == plan.params_after


def test_orthogonality_loss() -> None:
    shared = _basis(cifar_resnet(20), shared_rank=16, unique_rank=4)
    loss = sharify.orthogonality_loss(shared)
    assert loss.item() < 1e-10
    with torch.no_grad():
        shared.sharify_shared.layer1.conv1.weight.mul_(1.5)
    loss = sharify.orthogonality_loss(shared)
    assert loss.item() > 0.01 and loss.requires_grad
    plain = sharify.sharify(cifar_resnet(20), example_inputs=X)
    assert sharify.orthogonality_loss(plain).item() == 0.0
    assert sharify.orthogonality_loss(cifar_resnet(20)).item() == 0.0


def test_svd_init_exact_at_full_rank_and_error_falls_with_rank() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    expected = model(X)
    errors, outputs = [], []
    for unique_rank in (2, 16, 64):  # 64 per 64 channels = C: the unique basis captures every residual
        shared = _basis(model, shared_rank=8, unique_rank=unique_rank, init="svd").eval()
        r = sharify.report(model, shared)
        errors.append(max(g.dissimilarity for g in r.groups))
        outputs.append((shared(X) - expected).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5
    assert outputs[2] < 1e-4 < outputs[0]


def test_svd_error_falls_as_the_shared_rank_grows() -> None:
    """unique_rank fixed at 1: a larger shared basis leaves less of every member out, in every group.

    Each group holds 2 members (blocks 1 and 2 of a stage), so their stacked filters have rank 2C; at 128
    filters per 64 channels the shared basis has 2C filters and spans them all: exact.
    """
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    expected = model(X)
    errors, outputs = [], []
    for shared_rank in (4, 16, 64, 128):
        shared = _basis(model, shared_rank=shared_rank, unique_rank=1, init="svd").eval()
        errors.append([g.dissimilarity for g in sharify.report(model, shared).groups])
        outputs.append((shared(X) - expected).abs().max().item())
    assert all(len(e) == 6 for e in errors)  # 3 stages x (conv1, conv2)
    for group in zip(*errors, strict=True):
        assert group[0] > group[1] > group[2] > group[3] and group[3] < 1e-5
    assert outputs[0] > outputs[1] > outputs[2] > 1e-3 and outputs[3] < 1e-5


def test_per_stage_rank_mappings_build_the_planned_model() -> None:
    """sharify() with {stage: filters} ranks: each BasisConv2d has its stage's ranks, and the real parameter
    count equals the plan's and the hand arithmetic."""
    model = cifar_resnet(20)
    shared_rank, unique_rank = {"layer1": 3, "layer2": 5, "layer3": 7}, {"layer1": 1, "layer2": 2, "layer3": 3}
    p = sharify.plan(model, example_inputs=X, shared_rank=shared_rank, unique_rank=unique_rank, **BASIS)
    shared = _basis(model, shared_rank=shared_rank, unique_rank=unique_rank)
    widths = {"layer1": 16, "layer2": 32, "layer3": 64}
    bases = {name: m for name, m in shared.named_modules() if isinstance(m, sharify.BasisConv2d)}
    assert sorted(bases) == [f"layer{i}.{b}.conv{j}" for i in (1, 2, 3) for b in (1, 2) for j in (1, 2)]
    for name, m in bases.items():
        stage = name.split(".")[0]
        s, u, c = shared_rank[stage], unique_rank[stage], widths[stage]
        assert (m.unique.out_channels, m.shared.out_channels, m.norm.num_features) == (u, s, s + u)
        assert (m.coeff.in_channels, m.coeff.out_channels) == (s + u, c)

    def saved(c: int, s: int, u: int) -> int:  # 2 members: their 3x3 convs out; unique+BN+coeff each, one shared basis
        return 2 * c * c * 9 - (2 * (c * u * 9 + 2 * (s + u) + (s + u) * c) + c * s * 9)

    by_hand = 2 * sum(saved(c, shared_rank[st], unique_rank[st]) for st, c in widths.items())  # conv1 and conv2
    assert sum(q.numel() for q in shared.parameters()) == p.params_after == count_params(model) - by_hand == 104_418


def test_resnet34_s48u1_basis_batchnorms_have_s_plus_u_times_m_channels() -> None:
    """The paper's ResNet34-S48U1: m = C/64 = 1, 2, 4, 8 per stage, so each BasisConv2d's BatchNorm has
    (48 + 1) * m = 49, 98, 196, 392 channels; double bases in every non-first block (layer1.0 included)."""
    with torch.device("meta"):
        r34 = torchvision.models.resnet34()
    shared = sharify.sharify(r34, preset="dsfb-basis", shared_rank=48, unique_rank=1)
    m = {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}
    bases = {name: mod for name, mod in shared.named_modules() if isinstance(mod, sharify.BasisConv2d)}
    blocks = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
    assert sorted(bases) == sorted(f"{st}.{b}.conv{j}" for st, n in blocks.items() for b in range(1, n) for j in (1, 2))
    for name, mod in bases.items():
        k = m[name.split(".")[0]]
        assert (mod.norm.num_features, mod.shared.out_channels, mod.unique.out_channels) == (49 * k, 48 * k, k)
        assert mod.coeff.in_channels == 49 * k and mod.coeff.out_channels == 64 * k
    holders = sharify.shared_groups(shared)
    assert sorted(holders) == [f"layer{i}.conv{j}" for i in (1, 2, 3, 4) for j in (1, 2)]
    assert all(h.weight.shape == (48 * m[key.split(".")[0]], 64 * m[key.split(".")[0]], 3, 3)
               for key, (h, _) in holders.items())  # fmt: skip
    assert sum(q.numel() for q in shared.parameters()) == 11_786_968


def test_presets_and_explicit_override() -> None:
    with torch.device("meta"):
        r50 = torchvision.models.resnet50()
    assert sharify.plan(r50, preset="dsfb-shared++").params_after == 18_262_056
    assert sharify.plan(r50, preset="dsfb-shared").params_after == 20_506_664
    # explicit options override the preset
    assert sharify.plan(r50, preset="dsfb-shared", skip_first_block=False).params_after == 20_469_800
    p = sharify.plan(r50, preset="dsfb-shared++", positions=("last_spatial",))
    assert p.params_after == 20_506_664 and p.options["preset"] == "dsfb-shared++"
    # an explicit method drops the preset's init for the other method, unless init is given too
    p = sharify.plan(r50, preset="dsfb-basis", method="share")
    assert (p.options["method"], p.options["init"], p.options["positions"]) == ("share", "average", ["all_spatial"])
    assert p.options["skip_first_block"] and {g.method for g in p.groups} == {"share"}
    assert sharify.plan(r50, preset="dsfb-basis", method="share", init="first").options["init"] == "first"
    with pytest.raises(ValueError, match=r"unknown init 'orthogonal' for method='share'"):
        sharify.plan(r50, preset="dsfb-basis", method="share", init="orthogonal")
    p = sharify.plan(r50, preset="dsfb-shared", method="basis", shared_rank=8, unique_rank=1)
    assert p.options["init"] == "orthogonal" and {g.method for g in p.groups} == {"basis"}
    assert set(sharify.PRESETS) >= {
        "sharesnet",
        "sharesnet-wrn",
        "dsfb-shared",
        "dsfb-shared++",
        "dsfb-basis",
        "mobilenetv2-shared",
        "mobilenetv2-shared++",
    }


def test_shared_plus_plus_groups_are_the_3x3_and_the_last_1x1() -> None:
    with torch.device("meta"):
        r50 = torchvision.models.resnet50()
    p = sharify.plan(r50, preset="dsfb-shared++")
    assert {g.position for g in p.groups} == {"last_spatial", "last"}
    assert p.groups[0].members == ("layer1.1.conv2", "layer1.2.conv2")
    assert p.groups[1].members == ("layer1.1.conv3", "layer1.2.conv3")


def test_each_selector_indexes_the_whole_branch() -> None:
    """A selector picks from the block's full conv list; what an earlier selector took is skipped, not re-targeted."""
    with torch.device("meta"):
        r50, r34 = torchvision.models.resnet50(), torchvision.models.resnet34()

    def convs_by_position(p: sharify.SharingPlan) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for g in p.groups:
            out.setdefault(g.position, set()).update(m.rsplit(".", 1)[1] for m in g.members)
        return out

    assert convs_by_position(sharify.plan(r50, positions=("first", 1))) == {"first": {"conv1"}, "1": {"conv2"}}
    assert convs_by_position(sharify.plan(r50, positions=(1, "first"))) == {"first": {"conv1"}, "1": {"conv2"}}
    # conv2 is both the last spatial conv and index 1: the second selector finds it taken and adds nothing
    p = sharify.plan(r50, positions=("last_spatial", 1))
    assert convs_by_position(p) == {"last_spatial": {"conv2"}} and p.params_after == sharify.plan(r50).params_after
    assert convs_by_position(sharify.plan(r50, positions=("last_spatial", "all_spatial"))) == {
        "last_spatial": {"conv2"}
    }
    # Shared++ on a basic block: "last" is conv2, already shared by "last_spatial", so no group of conv1s
    plus, shared = sharify.plan(r34, preset="dsfb-shared++"), sharify.plan(r34, preset="dsfb-shared")
    assert convs_by_position(plus) == {"last_spatial": {"conv2"}}
    assert [g.members for g in plus.groups] == [g.members for g in shared.groups]
    assert plus.params_after == shared.params_after


def test_basis_preset_needs_ranks() -> None:
    with pytest.raises(ValueError, match=r"method='basis' needs shared_rank="):
        sharify.plan(cifar_resnet(20), example_inputs=X, preset="dsfb-basis")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shared_rank": 0, "unique_rank": 1}, r"shared_rank must be a positive int"),
        ({"shared_rank": 4, "unique_rank": -1}, r"unique_rank must be a positive int"),
        ({"shared_rank": 1000, "unique_rank": 1}, r"exceeds what `layer1\.1\.conv1` allows.*144-dimensional"),
        ({"shared_rank": 4, "unique_rank": 1, "init": "average"}, r"unknown init 'average' for method='basis'.*'svd'"),
        (
            {"shared_rank": {"layer9": 4}, "unique_rank": 1},
            r"shared_rank has no entry for stage 'layer1' \(its keys 'layer9' are no stage paths\); "
            r"give one int per stage path: 'layer1', 'layer2', 'layer3'",
        ),
        (
            {"shared_rank": 4, "unique_rank": {"layer1": 1, "layer2": 1}},
            r"unique_rank has no entry for stage 'layer3'; give one int per stage path: 'layer1', 'layer2', 'layer3'",
        ),
        (
            {"shared_rank": {"layer1": 4, "layer2": 4, "layer3": 4, "layer4": 4, "fc": 1}, "unique_rank": 1},
            r"shared_rank has entries for 'layer4', 'fc', which are no stage paths of this model; "
            r"valid stage paths: 'layer1', 'layer2', 'layer3'",
        ),
    ],
)
def test_basis_bad_input(kwargs: dict, match: str) -> None:
    model = cifar_resnet(20)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match) as info:
        sharify.sharify(model, example_inputs=X, inplace=True, **{**BASIS, **kwargs})
    assert not isinstance(info.value, sharify.SharifyError)
    assert state_equal(model, before) and not hasattr(model, SHARED_STORE_NAME)


def test_basis_on_a_1x1_position_is_a_value_error() -> None:
    with torch.device("meta"):
        r50 = torchvision.models.resnet50()
    match = r"dense 3x3 convs, but position 'layer1\.1\.conv3' holds a 1x1 conv"
    options = {"method": "basis", "positions": ("last",), "skip_first_block": True, "shared_rank": 8, "unique_rank": 1}
    with pytest.raises(ValueError, match=match):
        sharify.plan(r50, **options)
    model = PreActResNet(29)  # bottlenecks, 3 blocks per stage, real weights
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        sharify.sharify(model, example_inputs=X, inplace=True, **options)
    assert state_equal(model, before) and not hasattr(model, SHARED_STORE_NAME)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "sharesnet-50"}, r"unknown preset 'sharesnet-50'; valid: 'sharesnet'"),
        ({"positions": ("second",)}, r"unknown position selector 'second'; valid: 'last_spatial'"),
        ({"method": "prune"}, r"unknown method 'prune'; valid: 'share', 'basis'"),
        ({"shared_rank": 4}, r"only apply to method='basis'"),
        (
            {"positions": ("last_spatial", "last_spatial")},
            r"positions lists 'last_spatial' twice; give each selector once",
        ),
        ({"positions": ("last", -1)}, r"positions lists 'last' and -1, which pick the same conv"),
        ({"positions": (0, "first")}, r"positions lists 0 and 'first', which pick the same conv"),
        (
            {"positions": (2,)},
            r"position index 2 is out of range for every residual branch of CifarResNet: the "
            r"branches have 2 convs, so valid indices are -2\.\.1",
        ),
        ({"positions": ("first", -3)}, r"position index -3 is out of range.*valid indices are -2\.\.1"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    model = cifar_resnet(20)
    with pytest.raises(ValueError, match=match):
        sharify.plan(model, example_inputs=X, **kwargs)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        sharify.sharify(model, example_inputs=X, inplace=True, **kwargs)
    assert state_equal(model, before) and not hasattr(model, SHARED_STORE_NAME)


# Defined here, not in tests/nets.py: branches of different lengths are what the next test is about.
class _Residual(nn.Module):
    def __init__(self, convs: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(8, 8, 3, padding=1) for _ in range(convs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convs(x)


def test_an_index_that_fits_only_longer_branches_picks_there() -> None:
    """A stage of 2-conv branches and one of 3-conv branches: index 2 picks in the second stage only."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Residual(2), _Residual(2),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), _Residual(3), _Residual(3))  # fmt: skip
    p = sharify.plan(model, example_inputs=X, positions=(2,))
    assert [(g.position, g.members) for g in p.groups] == [("2", ("4.convs.2", "5.convs.2"))]
    with pytest.raises(ValueError, match=r"branches have 2 to 3 convs, so valid indices are -3\.\.2 "
                       r"\(-2\.\.1 pick a conv in every branch\)"):  # fmt: skip
        sharify.plan(model, example_inputs=X, positions=(3,))


def test_rank_scaling_rounds_half_up() -> None:
    """rank * C / 64 = 2.5 (C=16) and 5.0 (C=32): half up gives 3 (banker's rounding gave 2); at least 1."""
    p = sharify.plan(cifar_resnet(20), example_inputs=X, shared_rank=10, unique_rank=2, **BASIS)
    assert [(g.stage, g.shared_rank, g.unique_rank) for g in p.groups][::2] == [
        ("layer1", 3, 1),  # 10 * 16 / 64 = 2.5 -> 3; 2 * 16 / 64 = 0.5 -> 1
        ("layer2", 5, 1),  # 2 * 32 / 64 = 1.0
        ("layer3", 10, 2),
    ]
    from sharify.planning.rules import scaled_rank

    assert [scaled_rank(r, c) for r, c in [(1, 16), (1, 31), (1, 32), (3, 32), (5, 32), (7, 32), (48, 512)]] == [
        1, 1, 1, 2, 3, 4, 384
    ]  # fmt: skip


def test_per_stage_explicit_ranks() -> None:
    ranks = {"layer1": 3, "layer2": 5, "layer3": 7}
    p = sharify.plan(cifar_resnet(20), example_inputs=X, shared_rank=ranks, unique_rank=1, **BASIS)
    assert [(g.stage, g.shared_rank) for g in p.groups][::2] == [("layer1", 3), ("layer2", 5), ("layer3", 7)]


def test_unshare_of_a_basis_model_gives_each_block_its_own_basis() -> None:
    shared = _basis(cifar_resnet(20), shared_rank=8, unique_rank=2).eval()
    plain = sharify.unshare(shared).eval()
    assert plain.layer1[1].conv1.shared.weight is not plain.layer1[2].conv1.shared.weight
    torch.testing.assert_close(plain(X), shared(X))
