"""ParameterReport.params_after_folding: what sharing still saves once each BatchNorm is folded into its conv.

The figure is checked against real folding: :func:`sharify.fold_batchnorm` on the shared model (the shared
tensor kept once, a scale and bias per folded member) against torch's ``fuse_conv_bn_eval`` applied to the
conv -> BN pairs that torch.fx finds in the original model, counting the parameters of both folded models.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import sharify
from tests.nets import PreActNet


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """torch.fx's fusion pattern (``torch.fx.experimental.optimization.fuse``): a conv used only by a BN."""
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            src = node.args[0]
            if src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1:
                pairs.append((str(src.target), str(node.target)))
    return pairs


def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    folded = copy.deepcopy(model).eval()
    for conv, bn in pairs:
        folded.set_submodule(conv, fuse_conv_bn_eval(folded.get_submodule(conv), folded.get_submodule(bn)))
        folded.set_submodule(bn, nn.Identity())
    return folded


def _deployed_params(model: nn.Module) -> int:
    """Distinct tensors the forward computes with (holders counted through the members still reading them)."""
    sizes = {}
    for path, module in model.named_modules():
        if path.split(".")[0] == "sharify_shared":
            continue
        for p in module.parameters(recurse=False):
            sizes[id(p)] = p.numel()
        if sharify.is_shared_conv(module):
            for t in (module.weight, module.bias):
                if t is not None:
                    sizes[id(t)] = t.numel()
    return sum(sizes.values())


@pytest.mark.parametrize(
    ("build", "example", "all_folded"),
    [
        (lambda: torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), True),
        (PreActNet, torch.randn(2, 3, 16, 16), False),
    ],
    ids=["resnet18-post-activation", "pre-activation"],
)
def test_params_after_folding_matches_real_folding(build, example, all_folded):
    torch.manual_seed(0)
    original = build().eval()
    shared = sharify.sharify(original, example_inputs=example[:1]).eval()
    r = sharify.report(original, shared)

    pairs = _conv_bn_pairs(original)
    folded_original, folded_shared = _fold(original, pairs), sharify.fold_batchnorm(shared)
    with torch.no_grad():
        assert torch.allclose(folded_shared(example), shared(example), atol=1e-4)  # the folding is real
    saved_after_folding = _deployed_params(folded_original) - _deployed_params(folded_shared)
    assert r.params_before - r.params_after_folding == saved_after_folding

    if all_folded:  # every shared conv2 feeds bn2: each member keeps a scale (its bias replaces the BN's)
        assert all(g.folded == len(g.members) for g in r.groups)
        scales = sum(g.folded * g.shape[0] for g in r.groups)
        assert r.params_after_folding == r.params_after + scales < r.params_before
        # torch's own fusion on the shared model gives every member its own weight: nothing saved
        assert _deployed_params(_fold(shared, pairs)) == _deployed_params(folded_original)
    else:  # conv2 feeds the addition: nothing to fold into the members
        assert r.params_after_folding == r.params_after < r.params_before
        assert all(g.folded == 0 for g in r.groups)


def test_report_shows_both_numbers():
    original = torchvision.models.resnet18()
    r = sharify.report(original, sharify.sharify(original))
    line = (
        f"after conv-BN folding (deployment): {r.params_after_folding:,} parameters (-26.8%); 8 of 8 shared convs "
        "feed a BatchNorm, folded into a per-member scale and bias (sharify.fold_batchnorm)"
    )
    assert str(r).endswith(line) and r.to_markdown().endswith(line)
    data = r.to_dict()
    assert data["params_after_folding"] == r.params_after + 2 * (64 + 128 + 256 + 512)
    assert data["groups"][0]["folded"] == 2 and data["groups"][0]["params_after_folding"] == 64 * 64 * 9 + 2 * 64


def test_filter_basis_members_feed_a_concatenation_and_their_batchnorm_folds_into_the_coefficients():
    original = torchvision.models.resnet18()
    shared = sharify.sharify(original, method="basis", shared_rank=8, unique_rank=1)
    r = sharify.report(original, shared)
    assert all(g.folded == 0 for g in r.groups)  # shared basis -> cat -> BatchNorm -> 1x1: no member feeds a BN
    norms = sum(2 * m.norm.num_features for m in shared.modules() if isinstance(m, sharify.BasisConv2d))
    assert r.params_after_folding == r.params_after - norms < r.params_before
    folded_original = _fold(original, _conv_bn_pairs(original))
    assert _deployed_params(folded_original) - _deployed_params(sharify.fold_batchnorm(shared)) == (
        r.params_before - r.params_after_folding
    )


def test_post_training_quantization_gives_every_member_its_own_int8_weight():
    """torch.ao's post-training quantization does not keep the sharing (the README's deployment note), even in a
    pre-activation net where conv-BN folding keeps it: FX graph mode packs an int8 copy of the shared weight for
    every member conv; eager mode swaps modules by exact class, so the members are not converted at all."""
    from torch.ao.quantization import convert as convert_eager
    from torch.ao.quantization import get_default_qconfig, get_default_qconfig_mapping, prepare
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = next((e for e in ("x86", "fbgemm", "qnnpack") if e in torch.backends.quantized.supported_engines), None)
    if engine is None:
        pytest.skip("no quantized engine in this torch build")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    shared = sharify.sharify(PreActNet().eval(), example_inputs=x[:1]).eval()
    ((_, members),) = sharify.shared_groups(shared).values()
    assert len(members) == 4 and sharify.report(PreActNet(), shared).params_after_folding == sum(
        p.numel() for p in shared.parameters()
    )  # float: the saving survives folding here

    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        prepared = prepare_fx(copy.deepcopy(shared), get_default_qconfig_mapping(engine), (x,))
        prepared(x)
        fx_model = convert_fx(prepared)
        packed = {n.target: getattr(fx_model, n.target) for n in fx_model.graph.nodes
                  if n.op == "get_attr" and "packed_weight" in str(n.target)}  # fmt: skip
        per_member = [[k for k in packed if k.startswith(m.replace(".", "_") + "_")] for m in members]
        assert all(len(keys) == 1 for keys in per_member)  # one packed int8 weight per member, not per group
        int8 = [torch.ops.quantized.conv2d_unpack(packed[keys[0]])[0].int_repr() for keys in per_member]
        assert all(torch.equal(int8[0], w) for w in int8[1:])  # the same values, stored once per member
        error = (fx_model(x) - shared(x)).abs().max() / shared(x).abs().max()
        assert error < 0.1, error  # it runs and computes the model, up to int8 rounding

        eager = copy.deepcopy(shared)
        eager.qconfig = get_default_qconfig(engine)
        eager = prepare(eager)
        eager(x)  # calibration runs in float
        eager = convert_eager(eager)
        assert type(eager.stem).__module__.startswith("torch.ao.nn.quantized")  # a plain conv is converted
        assert all(type(eager.get_submodule(m)) is type(shared.get_submodule(m)) for m in members)  # members are not
        quantized_activation = torch.quantize_per_tensor(torch.randn(1, 16, 8, 8), 0.1, 128, torch.quint8)
        with pytest.raises((NotImplementedError, RuntimeError)):  # a float conv cannot take what the int8 net feeds it
            eager.get_submodule(members[0])(quantized_activation)
    finally:
        torch.backends.quantized.engine = previous
