"""sharify.fold_batchnorm: BatchNorms folded for inference, every shared weight still stored once.

Every model gets random BatchNorm statistics and affine parameters (equal default statistics would fold to
the identity and hide a wrong scale or shift), and the folded model must compute what the unfolded model
computes in eval mode.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
import torchvision
from timm.layers import BatchNormAct2d
from torch import nn

import sharify
from sharify.analysis.folding import conv_bn_pairs
from sharify.analysis.tracing import trace
from tests.conftest import state_equal
from tests.nets import PreActResNet, cifar_resnet, wide_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm (FrozenBatchNorm2d included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, torchvision.ops.FrozenBatchNorm2d)):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    return model


class BNActBlock(nn.Module):
    """A post-activation block normalised by timm's BatchNormAct2d (normalisation and activation in one module)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(width, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(self.bn1(self.conv1(x)))))


class BNActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(*(BNActBlock(16) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def _with_gain(model: nn.Module) -> nn.Module:
    """A member followed by a BatchNorm that also applies a ``shared_gain`` (absorbed into its folded scale)."""
    model.layer1[1].conv2._parameters["shared_gain"] = nn.Parameter(torch.rand(64) + 0.5)
    return model


def _stored(model: nn.Module) -> int:
    """Elements of the state_dict, each storage counted once."""
    return sum({v.data_ptr(): v.numel() for v in model.state_dict().values()}.values())


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


CASES: dict[str, tuple[Callable[[], nn.Module], dict, tuple[int, ...], Callable[[nn.Module], nn.Module]]] = {
    "resnet18": (torchvision.models.resnet18, {}, (2, 3, 32, 32), lambda m: m),
    "resnet18-scaled": (torchvision.models.resnet18, {"init": "scaled"}, (2, 3, 32, 32), lambda m: m),
    "resnet18-gain": (torchvision.models.resnet18, {}, (2, 3, 32, 32), _with_gain),
    "resnet18-frozen-bn": (
        lambda: torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d), {}, (2, 3, 32, 32),
        lambda m: m,
    ),
    "preact-bottleneck": (lambda: PreActResNet(29), {}, (2, 3, 16, 16), lambda m: m),
    "wrn-16-2-scaled": (lambda: wide_resnet(16, 2), {"init": "scaled"}, (2, 3, 16, 16), lambda m: m),
    "dsfb-basis": (
        lambda: cifar_resnet(20), {"preset": "dsfb-basis", "shared_rank": 8, "unique_rank": 1}, (2, 3, 16, 16),
        lambda m: m,
    ),
    "timm-bnact": (BNActNet, {}, (2, 3, 16, 16), lambda m: m),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_folded_model_computes_the_eval_model_and_stores_each_shared_tensor_once(case: str) -> None:
    build, options, shape, adjust = CASES[case]
    x = torch.randn(shape)
    original = randomise_norms(build()).eval()
    shared = adjust(randomise_norms(sharify.sharify(original, example_inputs=x[:1], **options), seed=1)).eval()
    before = copy.deepcopy(shared)

    folded = sharify.fold_batchnorm(shared)
    assert not folded.training and state_equal(shared, before)  # the input is not modified
    assert all(type(a) is type(b) for a, b in zip(shared.modules(), before.modules()))
    with torch.no_grad():
        assert _relative_error(shared(x), folded(x)) <= 1e-5
    left = [norm for _, norm in conv_bn_pairs(folded, trace(folded).graph) if folded.get_submodule(norm).eps != 0]
    assert left == []  # nothing left to fold (but BatchNormAct2d's identity normalisation before its activation)

    # one stored tensor per shared weight: the holder's, read by every member (none owns a copy)
    groups = sharify.shared_groups(folded)
    assert len(groups) == len(sharify.shared_groups(shared))
    state = folded.state_dict()
    for holder, members in groups.values():
        assert sum(v.data_ptr() == holder.weight.data_ptr() for v in state.values()) == 1
        assert all(f"{m}.weight" not in state for m in members)

    r = sharify.report(original, shared)
    if options.get("preset") != "dsfb-basis":  # the same architecture: torch's fusion of the original compares
        folded_original = sharify.fold_batchnorm(original)  # (an unshared model: torch's usual fusion)
        with torch.no_grad():
            assert _relative_error(original(x), folded_original(x)) <= 1e-5
        assert _stored(folded_original) - _stored(folded) == r.params_before - r.params_after_folding
    assert _stored(folded) < _stored(original)


def test_members_get_a_scale_and_bias_and_plain_convs_fold_as_torch_does() -> None:
    shared = randomise_norms(sharify.sharify(torchvision.models.resnet18())).eval()
    folded = sharify.fold_batchnorm(shared)
    member, plain = folded.layer1[0].conv2, folded.layer1[0].conv1
    assert sharify.is_shared_conv(member) and type(member).__name__ == "FoldedSharedConv2d"
    assert member.fold_scale.shape == member.fold_bias.shape == (64,) and "weight" not in member._parameters
    assert isinstance(folded.layer1[0].bn2, nn.Identity) and isinstance(folded.layer1[0].bn1, nn.Identity)
    expected = torch.nn.utils.fusion.fuse_conv_bn_eval(shared.layer1[0].conv1, shared.layer1[0].bn1)
    assert torch.equal(plain.weight, expected.weight) and torch.equal(plain.bias, expected.bias)
    bn = shared.layer1[0].bn2
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(member.fold_scale, scale)
    torch.testing.assert_close(member.fold_bias, bn.bias - bn.running_mean * scale)


def test_basis_batchnorm_folds_into_the_coefficients_and_the_basis_stays_shared() -> None:
    x = torch.randn(2, 3, 16, 16)
    shared = sharify.sharify(cifar_resnet(20), preset="dsfb-basis", shared_rank=8, unique_rank=1, example_inputs=x[:1])
    shared = randomise_norms(shared).eval()
    folded = sharify.fold_batchnorm(shared)
    bases = [m for m in folded.modules() if isinstance(m, sharify.BasisConv2d)]
    assert bases and all(isinstance(b.norm, nn.Identity) and b.coeff.bias is not None for b in bases)
    holders = {id(b.shared._sharify_holder) for b in bases}
    assert len(holders) == len(sharify.shared_groups(folded)) < len(bases)  # still one basis per group
    assert all(not hasattr(b.shared, "fold_scale") for b in bases)  # the basis feeds a concatenation


def test_timm_batchnorm_act_keeps_its_activation() -> None:
    shared = randomise_norms(sharify.sharify(BNActNet(), example_inputs=torch.randn(1, 3, 8, 8))).eval()
    folded = sharify.fold_batchnorm(shared)
    assert [type(m).__name__ for m in folded.blocks[1].bn1] == ["Identity", "ReLU"]  # its drop and act
    assert [type(m).__name__ for m in folded.blocks[1].bn2] == ["Identity", "Identity"]  # apply_act=False


class NormWithOwnForward(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


def test_a_batchnorm_with_its_own_forward_stays_with_identity_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), NormWithOwnForward(4))
    randomise_norms(model).eval()
    folded = sharify.fold_batchnorm(model)
    norm = folded[1]
    assert type(norm) is NormWithOwnForward and norm.eps == 0 and torch.equal(norm.running_var, torch.ones(4))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _relative_error(model(x), folded(x)) <= 1e-5


def test_inplace_folds_the_model_itself_and_a_second_fold_changes_nothing() -> None:
    shared = randomise_norms(sharify.sharify(torchvision.models.resnet18())).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = shared(x)
    assert sharify.fold_batchnorm(shared, inplace=True) is shared
    again = sharify.fold_batchnorm(shared)
    assert state_equal(again, shared)
    with torch.no_grad():
        assert _relative_error(expected, again(x)) <= 1e-5


def test_folded_model_pickles_and_unshares_into_torchs_folded_convs() -> None:
    shared = randomise_norms(sharify.sharify(torchvision.models.resnet18())).eval()
    folded = sharify.fold_batchnorm(shared)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = folded(x)
        copied = pickle.loads(pickle.dumps(folded))
        assert type(copied.layer2[1].conv2) is type(folded.layer2[1].conv2) and torch.equal(copied(x), y)
        holder = copied.sharify_shared.layer2.conv2
        assert copied.layer2[0].conv2._sharify_holder is holder and copied.layer2[1].conv2._sharify_holder is holder
        plain = sharify.unshare(folded)  # each member gets torch's folded weight and bias
        assert type(plain.layer2[1].conv2) is nn.Conv2d and not hasattr(plain.layer2[1].conv2, "fold_scale")
        assert plain.layer2[1].conv2.bias is not None and _relative_error(y, plain(x)) <= 1e-5


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow in the root's own forward
            x = -x
        return self.bn(self.conv(x))


def test_errors_name_the_problem_and_leave_the_model_unchanged() -> None:
    model = Untraceable()
    before = copy.deepcopy(model)
    with pytest.raises(sharify.UntraceableError, match=r"fold_batchnorm cannot find the conv -> BatchNorm pairs"):
        sharify.fold_batchnorm(model, inplace=True)
    assert state_equal(model, before) and isinstance(model.bn, nn.BatchNorm2d)
    with pytest.raises(sharify.UnsupportedModelError, match=r"pass the bare model \(fold_batchnorm\(wrapped.module\)"):
        sharify.fold_batchnorm(nn.DataParallel(nn.Conv2d(1, 1, 1)))
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module"):
        sharify.fold_batchnorm("resnet18")  # type: ignore[type-var]
    with pytest.raises(TypeError, match="inplace must be True or False"):
        sharify.fold_batchnorm(nn.Conv2d(1, 1, 1), inplace="yes")  # type: ignore[arg-type]
