"""sharify.quantize_int8: weight-only int8 in which each shared tensor is quantised and stored once."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors.torch import save
from torch import nn

import sharify
from sharify.deploy.int8 import dequantize, quantize_weight
from tests.conftest import state_equal
from tests.nets import cifar_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(model: nn.Module, steps: int = 5) -> nn.Module:
    """A few SGD steps on random data, so that weights and BatchNorm statistics are no longer their init."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # set up before the function-scoped one_thread fixture applies
    try:
        torch.manual_seed(0)
        original = cifar_resnet(20)
        shared = _trained(sharify.sharify(original, example_inputs=torch.randn(1, 3, 16, 16)))
    finally:
        torch.set_num_threads(threads)
    return original.eval(), shared


def _int8(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.dtype == torch.int8}


def test_each_shared_tensor_is_stored_once_as_int8(models) -> None:
    original, shared = models
    before = copy.deepcopy(shared)
    q = sharify.quantize_int8(shared)
    assert state_equal(shared, before)  # the input is not modified
    groups = sharify.shared_groups(q)
    weights = [m for m in shared.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not sharify.is_shared_conv(m)]
    int8 = _int8(q)
    assert len(int8) == len(groups) + len(weights)  # one per holder, one per unshared conv / Linear
    assert not any(p.dtype == torch.int8 for p in q.parameters())  # buffers: nothing to train
    for holder, members in groups.values():
        assert type(holder).__name__ == "Int8SharedConvParams" and len(members) > 1
        assert sum(v.data_ptr() == holder.weight_int8.data_ptr() for v in int8.values()) == 1
        assert all(f"{m}.weight_int8" not in int8 and q.get_submodule(m)._sharify_holder is holder for m in members)
    assert not [k for k, v in q.state_dict().items() if v.is_floating_point() and v.dim() == 4]  # no float conv left

    # the file: int8 shared model against the original quantised the same way
    shared_file, original_file = save(q.state_dict()), save(sharify.quantize_int8(original).state_dict())
    r = sharify.report(original, shared)
    saved_bytes = sum((len(m) - 1) * (h.weight.numel() + 4 * h.weight.shape[0]) for h, m in groups.values())
    assert r.saved == sum((len(m) - 1) * h.weight.numel() for h, m in groups.values())
    assert abs((len(original_file) - len(shared_file)) - saved_bytes) < 2048  # up to the headers' sizes


def test_int8_error_is_bounded(models) -> None:
    _, shared = models
    q = sharify.quantize_int8(shared)
    for holder, _ in sharify.shared_groups(shared).values():  # each weight off by at most half its channel's step
        w = holder.weight.detach()
        qw, scale = quantize_weight(w)
        assert qw.dtype == torch.int8 and qw.abs().max() == 127 and scale.shape == (w.shape[0],)
        error = (dequantize(qw, scale) - w).abs()
        assert (error <= scale.view(-1, 1, 1, 1) / 2 * (1 + 1e-5)).all()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, yq = shared(x), q(x)
    relative = ((y - yq).norm() / y.norm()).item()
    assert relative < 0.02, relative
    assert (y.argmax(1) == yq.argmax(1)).float().mean() >= 0.9


def test_folded_then_quantised_and_exported_keeps_one_int8_constant_per_shared_tensor(models) -> None:
    _, shared = models
    q = sharify.quantize_int8(sharify.fold_batchnorm(shared))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = q(x)
        assert ((y - shared(x)).norm() / shared(x).norm()) < 0.02
    program = torch.export.export(q, (x,))
    int8 = [k for k, v in program.state_dict.items() if v.dtype == torch.int8]
    assert sorted(int8) == sorted(_int8(q))  # the holders' once, no per-member copy
    torch.testing.assert_close(program.module()(x), y)


def test_tied_weight_is_quantised_once_and_assigning_a_weight_makes_a_float_module() -> None:
    a, b = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    q = sharify.quantize_int8(nn.Sequential(a, b))
    assert type(q[0]).__name__ == "Int8Linear" and q[0].weight_int8 is q[1].weight_int8
    x = torch.randn(3, 8)
    torch.testing.assert_close(q(x), b(a(x)), rtol=0.02, atol=0.02)
    q[1].weight = nn.Parameter(torch.eye(8))
    assert type(q[1]) is nn.Linear and "weight_int8" not in q[1]._buffers
    torch.testing.assert_close(q[1](x), x)


def test_pickle_deepcopy_and_inplace(models) -> None:
    _, shared = models
    q = sharify.quantize_int8(copy.deepcopy(shared), inplace=True)
    x = torch.randn(2, 3, 16, 16)
    for again in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
        assert type(again.conv1) is type(q.conv1) and state_equal(again, q)
        ((holder, members),) = list(sharify.shared_groups(again).values())[:1]
        assert all(again.get_submodule(m)._sharify_holder is holder for m in members)
        with torch.no_grad():
            assert torch.equal(again(x), q(x))


def test_errors() -> None:
    with pytest.raises(sharify.UnsupportedModelError, match=r"quantize_int8\(wrapped.module\)"):
        sharify.quantize_int8(nn.DataParallel(nn.Linear(1, 1)))
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module"):
        sharify.quantize_int8(torch.zeros(1))  # type: ignore[type-var]
    with pytest.raises(TypeError, match="inplace must be True or False"):
        sharify.quantize_int8(nn.Linear(1, 1), inplace=1)  # type: ignore[arg-type]


def _templates_task(n: int, gen: torch.Generator, templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: each class one random 3x16x16 template, under noise of 1.5 times its scale."""
    y = torch.randint(0, len(templates), (n,), generator=gen)
    return templates[y] + 1.5 * torch.randn(n, *templates.shape[1:], generator=gen), y


def test_int8_accuracy_is_within_a_point_of_float_on_a_trained_model() -> None:
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 3, 16, 16, generator=gen)
    model = sharify.sharify(cifar_resnet(14, width=8), example_inputs=torch.randn(1, 3, 16, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(60):
        x, y = _templates_task(32, gen, templates)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x, y = _templates_task(1000, gen, templates)
    variants = {"float": model, "int8": sharify.quantize_int8(model)}
    variants["folded int8"] = sharify.quantize_int8(sharify.fold_batchnorm(model))
    with torch.no_grad():
        predicted = {k: m(x).argmax(1) for k, m in variants.items()}
    accuracy = {k: (p == y).float().mean().item() for k, p in predicted.items()}
    assert accuracy["float"] > 0.5, accuracy  # trained well above chance (0.1): the bound below means something
    assert all(abs(a - accuracy["float"]) <= 0.01 for a in accuracy.values()), accuracy
    assert (predicted["int8"] == predicted["float"]).float().mean() >= 0.97
