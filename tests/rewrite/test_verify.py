"""sharify.verify / sharify.retie: which operations break the ties (measured, not assumed) and the repairs."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import sharify

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def _base() -> nn.Module:
    torch.manual_seed(0)
    return sharify.sharify(torchvision.models.resnet18(num_classes=4)).eval()


@pytest.fixture
def shared(_base: nn.Module) -> nn.Module:
    return copy.deepcopy(_base)


def _holder(model: nn.Module, key: str = "layer1.conv2") -> sharify.SharedConvParams:
    return model.sharify_shared.get_submodule(key)


def _reads_registered(model: nn.Module) -> bool:
    """Every member's weight is the registered holder's tensor (identity, not just equal values)."""
    registered = {k: h for k, (h, _) in sharify.shared_groups(model).items()}
    members = [(p, m) for p, m in model.named_modules() if sharify.is_shared_conv(m)]
    return bool(members) and all(m.weight is registered[m._sharify_holder.key].weight for _, m in members)


def _random_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    return {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}


# --- operations that keep the ties with this design (members read the holder at call time) ----------------


def test_load_state_dict_assign_keeps_ties(shared):
    state = _random_state(shared)
    shared.load_state_dict(state, assign=True)
    assert sharify.verify(shared) == [] and sharify.retie(shared) == []
    assert _holder(shared).weight is not None and torch.equal(
        _holder(shared).weight, state["sharify_shared.layer1.conv2.weight"]
    )
    assert shared.layer1[0].conv2.weight is _holder(shared).weight is shared.layer1[1].conv2.weight
    reference = sharify.sharify(torchvision.models.resnet18(num_classes=4)).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(shared(X), reference(X))


def test_meta_init_and_to_empty_keep_ties(shared):
    with torch.device("meta"):
        model = sharify.sharify(torchvision.models.resnet18(num_classes=4))
    assert sharify.verify(model) == []
    model = model.to_empty(device="cpu")
    assert sharify.verify(model) == [] and sharify.retie(model) == [] and _reads_registered(model)
    model.load_state_dict(shared.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(X), shared(X))


@pytest.mark.parametrize("flag", ["overwrite", "swap"])
def test_param_conversion_flags_keep_ties(shared, flag):
    setter = getattr(torch.__future__, f"set_{flag}_module_params_on_conversion")
    before = _holder(shared).weight
    setter(True)
    try:
        converted = shared.to(torch.float64)
    finally:
        setter(False)
    assert sharify.verify(converted) == [] and _reads_registered(converted)
    assert _holder(converted).weight.dtype == torch.float64
    if flag == "overwrite":
        assert _holder(converted).weight is not before  # a new Parameter, yet the members follow it


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_whole_model_copies_keep_ties(shared, clone):
    other = clone(shared)
    assert sharify.verify(other) == [] and _reads_registered(other)
    assert _holder(other).weight is not _holder(shared).weight


# --- operations that break ties, and the repairs -------------------------------------------------------------


def test_deepcopied_block_put_back(shared):
    shared.layer1 = copy.deepcopy(shared.layer1)
    problems = sharify.verify(shared)
    assert len(problems) == 1
    assert "`layer1.0.conv2`, `layer1.1.conv2` read a copy of shared group `layer1.conv2`" in problems[0]
    fixes = sharify.retie(shared)
    assert fixes == ["re-pointed `layer1.0.conv2`, `layer1.1.conv2` to the registered holder `layer1.conv2`"]
    assert sharify.verify(shared) == [] and _reads_registered(shared)
    # Gradients reach the registered tensor again (the one optimizers hold).
    shared(X).sum().backward()
    assert _holder(shared).weight.grad is not None


def test_replaced_store_with_other_values(shared):
    store = copy.deepcopy(shared.sharify_shared)
    with torch.no_grad():
        store.get_submodule("layer2.conv2").weight.mul_(2)
    shared.sharify_shared = store
    problems = sharify.verify(shared)
    assert len(problems) == 4 and all("read a copy" in p for p in problems)
    fixes = sharify.retie(shared)
    assert any("layer2.conv2` (the copy's values differed; kept the registered ones)" in f for f in fixes)
    assert _reads_registered(shared) and shared.layer2[0].conv2.weight is store.get_submodule("layer2.conv2").weight


def test_deleted_store_is_recreated(shared):
    keys = list(shared.state_dict())
    weight = _holder(shared).weight
    del shared.sharify_shared
    assert "whose holder is not registered in the model" in sharify.verify(shared)[0]
    assert "sharify_shared.layer1.conv2.weight" not in shared.state_dict()
    fixes = sharify.retie(shared)
    assert len(fixes) == 4 and "created the store" in fixes[0]
    assert sharify.verify(shared) == [] and sorted(shared.state_dict()) == sorted(keys)
    assert _holder(shared).weight is weight


def test_copied_block_used_on_its_own(shared):
    block = copy.deepcopy(shared.layer2)
    assert not any(p is block[0].conv2.weight for p in block.parameters())  # an optimizer would not see it
    assert len(sharify.verify(block)) == 1
    sharify.retie(block)
    assert "sharify_shared.layer2.conv2.weight" in block.state_dict()
    assert block[0].conv2.weight is block.sharify_shared.layer2.conv2.weight


def test_conv_tied_by_assignment_becomes_member_again(shared):
    holder = _holder(shared)
    shared.layer1[0].conv2.weight = holder.weight  # un-shares the conv, then assigns the holder's own tensor
    assert not sharify.is_shared_conv(shared.layer1[0].conv2)
    problems = sharify.verify(shared)
    assert problems == [
        "`layer1.0.conv2` has its own weight that is the shared tensor `sharify_shared.layer1.conv2.weight` (tied by "
        "assignment): state_dict() holds it twice and safetensors refuses to save it"
    ]
    assert sharify.retie(shared) == ["made `layer1.0.conv2` a member of `layer1.conv2` again"]
    assert sharify.is_shared_conv(shared.layer1[0].conv2) and sharify.verify(shared) == []
    assert "layer1.0.conv2.weight" not in shared.state_dict()


def test_holder_aliased_by_unrelated_tensor_is_not_guessed(shared):
    shared.register_buffer("alias", _holder(shared).weight.detach()[0])
    problems = sharify.verify(shared)
    assert (
        len(problems) == 1
        and "`alias` shares memory with the shared tensor `sharify_shared.layer1.conv2.weight`" in problems[0]
    )
    with pytest.raises(sharify.TieError, match=r"cannot repair.*`alias` shares memory"):
        sharify.retie(shared)


def test_two_different_orphan_copies_raise_and_modify_nothing(shared):
    shared.layer1[0] = copy.deepcopy(shared.layer1[0])
    with torch.no_grad():
        shared.layer1[0].conv2._sharify_holder.weight.add_(1)
    del shared.sharify_shared
    with pytest.raises(sharify.TieError, match=r"two different copies of holder `layer1\.conv2`"):
        sharify.retie(shared)
    assert not hasattr(shared, "sharify_shared")  # all or nothing: the other groups were not repaired either


def test_holder_of_wrong_shape(shared):
    _holder(shared).weight = nn.Parameter(torch.zeros(3, 3))
    problems = sharify.verify(shared)
    assert problems == [
        "`layer1.0.conv2` expects a weight of shape (64, 64, 3, 3) but its holder `layer1.conv2` has (3, 3)"
    ]
    with pytest.raises(sharify.TieError, match=r"expects a weight of shape \(64, 64, 3, 3\)"):
        sharify.retie(shared)


def test_unshared_model_and_bad_arguments():
    assert sharify.verify(torchvision.models.resnet18()) == []
    assert sharify.retie(torchvision.models.resnet18()) == []
    with pytest.raises(TypeError, match=r"verify expects a torch\.nn\.Module"):
        sharify.verify("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"retie expects a torch\.nn\.Module"):
        sharify.retie(None)  # type: ignore[arg-type]


def test_holder_key_that_disagrees_with_its_place(shared):
    _holder(shared).key = "elsewhere"
    assert sharify.verify(shared) == [
        "the holder registered at `sharify_shared.layer1.conv2` says its key is `elsewhere`"
    ]
    assert sharify.retie(shared) == ["set the key of `sharify_shared.layer1.conv2` to `layer1.conv2`"]
    assert "layer1.conv2" in sharify.shared_groups(shared) and sharify.verify(shared) == []


def test_foreign_store_is_not_guessed(shared):
    del shared.sharify_shared
    shared.sharify_shared = nn.Identity()
    assert sharify.verify(shared) == ["`sharify_shared` is not sharify's store of shared tensors (it is Identity)"]
    with pytest.raises(sharify.TieError, match="not sharify's store"):
        sharify.retie(shared)
