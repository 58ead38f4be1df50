"""Property-based tests over randomly generated residual networks (hypothesis).

For every generated net: each group has >= 2 members with one signature; the saved parameters equal
sum((n - 1) * size) and the groups the generator's structure predicts; the output shape is kept and
every parameter gets a gradient.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharify
from sharify.planning.plan import ConvSignature
from tests.nets import NetSpec, RandomNet, StageSpec

stage_specs = st.builds(
    StageSpec, width=st.sampled_from([4, 8, 12]), depth=st.integers(1, 4), stride=st.sampled_from([1, 2])
)
net_specs = st.builds(
    NetSpec,
    block=st.sampled_from(["basic", "bottleneck", "preact"]),
    stages=st.lists(stage_specs, min_size=1, max_size=3).map(tuple),
    bias=st.booleans(),
    norm=st.sampled_from(["bn", "gn", "none"]),
    add=st.sampled_from(["+", "+=", "torch.add", "add", "add_", "alpha", "layerscale"]),
    container=st.sampled_from(["sequential", "modulelist"]),
)


def expected_saved(net: RandomNet, x: torch.Tensor) -> int:
    """By construction: blocks in order with their output shapes; consecutive equal shapes form a
    stage; the last 3x3 conv of each block (convs[1]) shares with same-signature ones of its stage."""
    shapes, blocks = [], []
    with torch.no_grad():
        h = net.stem(x)
        for stage in net.stages:
            for block in stage:
                h = block(h)
                shapes.append(tuple(h.shape))
                blocks.append(block)
    saved, i = 0, 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and shapes[j + 1] == shapes[i]:
            j += 1
        by_sig: dict[ConvSignature, list[int]] = {}
        for b in blocks[i : j + 1]:
            conv = b.convs[1]
            by_sig.setdefault(ConvSignature.of(conv), []).append(
                conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
            )
        saved += sum((len(v) - 1) * v[0] for v in by_sig.values())
        i = j + 1
    return saved


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs)
def test_random_residual_nets(spec: NetSpec) -> None:
    torch.manual_seed(0)
    net = RandomNet(spec).eval()
    x = torch.randn(2, 3, 16, 16)
    plan = sharify.plan(net, example_inputs=x)
    modules = dict(net.named_modules())
    for g in plan.groups:
        assert len(g.members) >= 2
        assert {ConvSignature.of(modules[m]) for m in g.members} == {g.signature}
    assert plan.params_saved == sum((len(g.members) - 1) * g.size for g in plan.groups)
    assert plan.params_saved == expected_saved(net, x)
    if not plan.groups:
        return
    shared = sharify.sharify(net, example_inputs=x)
    assert sharify.report(net, shared).params_after == plan.params_after
    out = shared.eval()(x)
    assert out.shape == net(x).shape
    shared.train()
    shared(x).square().mean().backward()
    missing = [n for n, p in shared.named_parameters() if p.grad is None]
    assert not missing, missing
