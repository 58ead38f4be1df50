"""The rewrite's two passes: :func:`~sharify.rewrite.apply.compute_edits` (pure) and
:func:`~sharify.rewrite.apply.apply_edits` (all or nothing, with one undo log)."""

from __future__ import annotations

import copy

import pytest
import torch

import sharify
from benchmarks.cifar_models import cifar_resnet
from sharify import layers
from sharify.rewrite.apply import apply_edits, compute_edits
from tests.conftest import perturb, state_equal

X32 = torch.randn(2, 3, 32, 32)

# Options whose edits use every kind of change: attached members, BatchNorms absorbing gains, replaced members
# and aligned neighbours.
OPTIONS = {
    "scaled": {"init": "scaled"},
    "scaled-aligned": {"init": "scaled", "align": True},
    "basis-svd-aligned": {"method": "basis", "init": "svd", "shared_rank": 8, "unique_rank": 4, "align": True},
}


def _model() -> torch.nn.Module:
    return perturb(cifar_resnet(20)).eval()


@pytest.mark.parametrize("options", OPTIONS.values(), ids=list(OPTIONS))
def test_compute_edits_changes_nothing_and_describes_the_rewrite(options) -> None:
    model = _model()
    before = copy.deepcopy(model)
    plan = sharify.plan(model, example_inputs=X32, **options)
    edits = compute_edits(model, plan, plan.options["init"])
    assert state_equal(model, before) and [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    assert not hasattr(model, layers.SHARED_STORE_NAME)
    members = [p for g in plan.groups for p in g.members]
    changed = [e.path for e in edits.attach] + [path for path, _ in edits.replace]
    assert changed == members and sorted(edits.store.holders()) == sorted(g.key for g in plan.groups)
    assert edits.assign and not set(edits.assign) & set(members)  # neighbours and BatchNorms, never the members
    apply_edits(model, edits)
    expected = sharify.apply_plan(before, plan)
    assert state_equal(model, expected)
    torch.testing.assert_close(model(X32), expected(X32))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=list(OPTIONS))
def test_a_failure_in_the_last_edit_undoes_all_the_others(options, monkeypatch) -> None:
    model = _model()
    before = copy.deepcopy(model)
    plan = sharify.plan(model, example_inputs=X32, **options)
    real = sharify.rewrite.apply._assign
    calls = {"n": 0}

    def fail_last(module, values) -> None:  # the last assignment fails after the others were made; undo works
        calls["n"] += 1
        if calls["n"] == n_assign:
            raise RuntimeError("injected")
        real(module, values)

    n_assign = len(compute_edits(copy.deepcopy(model), plan, plan.options["init"]).assign)
    monkeypatch.setattr(sharify.rewrite.apply, "_assign", fail_last)
    with pytest.raises(RuntimeError, match="injected"):
        sharify.apply_plan(model, plan, inplace=True)
    assert state_equal(model, before)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    assert not any(sharify.is_shared_conv(m) for m in model.modules())
    assert not hasattr(model, layers.SHARED_STORE_NAME)
    torch.testing.assert_close(model(X32), before(X32), rtol=0, atol=0)
