"""Which builder a saved model comes from (sharify/source.py): torchvision models saved without ``source=``.

A torchvision model does not know its builder's name, so ``sharify.save`` identifies it by structure: among the
builders of the model's class (built on the meta device with its ``num_classes``), the one with the same module
tree, hyperparameters and state_dict shapes. Exactly one: recorded, and ``sharify.load(path)`` rebuilds the model.
None or several: saved anyway, with a warning that ``load`` will need ``model=``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import sharify
from sharify.io.source import build_structure, detect_source, registered_on_meta
from tests.conftest import perturb, state_equal

X = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize(
    ("builder", "kwargs", "options", "recorded"),
    [
        ("resnet18", {}, {}, {}),  # the default head: no kwargs recorded
        # another head, and weights that are not the builder's (scaled init on channel-aligned members)
        ("resnet18", {"num_classes": 7}, {"init": "scaled", "align": True}, {"num_classes": 7}),
    ],
    ids=["resnet18", "resnet18-7-classes-aligned"],
)
def test_torchvision_model_saved_without_source_is_rebuilt_by_load(tmp_path, builder, kwargs, options, recorded):
    shared = perturb(sharify.sharify(getattr(torchvision.models, builder)(**kwargs), **options)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # identified: nothing to warn about
        path = sharify.save(shared, tmp_path / "m.safetensors")
    source = sharify.ModelSource("torchvision", builder, recorded)
    assert sharify.read_recipe(path).source == source == detect_source(shared)
    restored = sharify.load(path).eval()
    assert type(restored) is type(shared) and state_equal(restored, shared) and sharify.verify(restored) == []
    with torch.no_grad():
        assert torch.equal(restored(X), shared(X))


# Defined here, not in tests/nets.py: a subclass of a torchvision class is what these tests are about.
class MyResNet(torchvision.models.ResNet):
    """A user's subclass: no torchvision builder makes it."""


def _subclass() -> nn.Module:
    return MyResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=3)


def _without_maxpool() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=3)
    model.maxpool = nn.Identity()  # same state_dict as resnet18's: only the module tree tells them apart
    return model


def _other_eps() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=3)
    model.layer3[1].bn2.eps = 1e-3  # same module tree and shapes: only the hyperparameters differ
    model.trained_for = "cifar"  # an attribute of the user's own is not a hyperparameter: ignored
    return model


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_subclass, r"saving MyResNet without a source: no torchvision classification builder makes a .*MyResNet\."),
        (
            _without_maxpool,
            r"saving ResNet without a source: no torchvision builder of ResNet makes this architecture \(closest, "
            r"resnet18: `maxpool` is MaxPool2d in torchvision's resnet18 but Identity in the model\)\.",
        ),
        (_other_eps, r"closest, resnet18: `layer3\.1\.bn2` has eps=1e-05 in torchvision's resnet18 but 0\.001"),
    ],
    ids=["subclass", "maxpool-replaced", "bn-eps-changed"],
)
def test_unidentified_torchvision_model_is_saved_with_a_warning(tmp_path, make, match):
    model = make()
    shared = perturb(sharify.sharify(model)).eval()
    with pytest.warns(UserWarning, match=match) as record:
        path = sharify.save(shared, tmp_path / "m.safetensors")
    assert [w.filename for w in record] == [__file__]  # points at the caller's line
    assert r"sharify.load(path, model=...)" in str(record[0].message) and "save(..., source=...)" in str(
        record[0].message
    )
    assert sharify.read_recipe(path).source is None and detect_source(shared) is None
    with pytest.raises(sharify.CheckpointError, match=r"records no source.*model="):
        sharify.load(path)
    restored = sharify.load(path, model=model).eval()
    assert state_equal(restored, shared)


def test_several_matching_builders_record_no_source(tmp_path, monkeypatch):
    """An alias registered next to resnet18 makes the same architecture: neither is recorded."""
    monkeypatch.setitem(torchvision.models._api.BUILTIN_MODELS, "resnet18_alias", torchvision.models.resnet18)
    shared = sharify.sharify(torchvision.models.resnet18())
    with pytest.warns(UserWarning, match=r"it matches several torchvision builders \(resnet18, resnet18_alias\)"):
        path = sharify.save(shared, tmp_path / "m.safetensors")
    assert sharify.read_recipe(path).source is None


def test_user_model_is_saved_without_a_warning(tmp_path):
    """Not a torchvision model: no builder to find, and saving it without a source is the normal case."""
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = sharify.save(plain, tmp_path / "m.safetensors")
    assert sharify.read_recipe(path).source is None


def _hook_dicts() -> tuple[dict[int, object], dict[int, object]]:
    """Where torch keeps the global parameter and buffer registration hooks (``registered_on_meta`` adds one each)."""
    module = nn.modules.module
    return module._global_parameter_registration_hooks, module._global_buffer_registration_hooks


def _registration_hooks() -> list[object]:
    return [hook for hooks in _hook_dicts() for hook in hooks.values()]


def _built_on_cpu() -> bool:
    """A parameter and a buffer registered now get memory: no registration hook is left moving them to meta."""
    return nn.Linear(2, 2).weight.device.type == "cpu" and nn.BatchNorm1d(2).running_mean.device.type == "cpu"


def test_builders_that_compute_with_tensors_are_built_without_weights():
    """RegNet computes its widths with tensors, which the meta device cannot; its parameters still get no memory."""
    hooks = _registration_hooks()
    model = build_structure(sharify.ModelSource("torchvision", "regnet_x_400mf", {"num_classes": 5}))
    assert isinstance(model, torchvision.models.RegNet) and model.fc.out_features == 5
    assert all(t.is_meta for t in model.state_dict().values())
    assert _registration_hooks() == hooks  # the hooks are removed
    assert _built_on_cpu()


def test_registration_hooks_are_removed_when_the_builder_fails():
    hooks = _registration_hooks()
    with pytest.raises(ValueError, match="the builder fails"), registered_on_meta():
        assert len(_registration_hooks()) == len(hooks) + 2
        assert nn.Linear(2, 2).weight.is_meta and nn.BatchNorm1d(2).running_mean.is_meta
        raise ValueError("the builder fails")
    assert _registration_hooks() == hooks and _built_on_cpu()


def test_hooks_left_installed_fail_the_checks(monkeypatch: pytest.MonkeyPatch):
    """The checks above can fail: with handles that do not remove their hook, both see what is left."""
    dicts = _hook_dicts()
    before = [dict(d) for d in dicts]
    hooks = _registration_hooks()
    monkeypatch.setattr(torch.utils.hooks.RemovableHandle, "remove", lambda self: None)
    try:
        with registered_on_meta():
            pass
        monkeypatch.undo()
        assert _registration_hooks() != hooks and not _built_on_cpu()
    finally:
        monkeypatch.undo()
        for d, kept in zip(dicts, before, strict=True):
            for key in [k for k in d if k not in kept]:
                del d[key]
    assert _registration_hooks() == hooks and _built_on_cpu()
