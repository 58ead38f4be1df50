"""Wrapped models (DDP, DataParallel, torch.compile): rewriting refuses them, reading looks through them.

Policy (sharify/_wrappers.py): ``sharify``, ``load`` into a given model and ``retie`` refuse a wrapper with a
message saying to sharify/load/retie the bare model and wrap the result, because the wrapper has already
captured the unshared parameters (DDP's reducer and broadcast, dynamo's guards). ``save`` and ``verify``
only read, so they unwrap (``save`` with a UserWarning): the file holds the bare model's keys and loads into a
bare model.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import sharify
from tests.nets import NormFreeNet

EXAMPLE = torch.randn(1, 3, 8, 8)


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "ddp": _ddp,
    "data_parallel": nn.DataParallel,
    "compile": torch.compile,
    "compile(ddp)": lambda m: torch.compile(_ddp(m)),
}


@pytest.fixture(params=list(WRAPPERS))
def wrap(request: pytest.FixtureRequest) -> Callable[[nn.Module], nn.Module]:
    if "ddp" in request.param:
        request.getfixturevalue("process_group")
    return WRAPPERS[request.param]


def test_sharify_refuses_wrappers(wrap):
    wrapped = wrap(NormFreeNet())
    with pytest.raises(
        sharify.UnsupportedModelError, match=r"wrapper; sharify the bare model first and wrap the result"
    ):
        sharify.sharify(wrapped, example_inputs=EXAMPLE)


def test_save_unwraps_and_load_refuses_wrappers(tmp_path, wrap):
    with torch.no_grad():
        shared = sharify.sharify(NormFreeNet(), example_inputs=EXAMPLE)
    wrapped = wrap(shared)
    outer = type(wrapped).__name__  # e.g. "OptimizedModule > DistributedDataParallel" for compile(ddp)
    with pytest.warns(UserWarning, match=rf"wrapped in {outer}\b.*; saved the bare NormFreeNet inside") as record:
        path = sharify.save(wrapped, tmp_path / "wrapped.safetensors")
    assert [w.filename for w in record if "wrapped in" in str(w.message)] == [__file__]  # points at the caller
    bare = sharify.save(shared, tmp_path / "bare.safetensors")
    a, b = load_file(path), load_file(bare)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in a)
    assert [g.key for g in sharify.read_recipe(path).groups] == [g.key for g in sharify.read_recipe(bare).groups]

    restored = sharify.load(path, NormFreeNet())
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in restored.state_dict().items())
    with pytest.raises(sharify.UnsupportedModelError, match="load into the bare model and wrap the result"):
        sharify.load(path, wrap(NormFreeNet()))


def test_verify_unwraps_and_retie_refuses_wrappers(wrap):
    shared = sharify.sharify(NormFreeNet(), example_inputs=EXAMPLE)
    wrapped = wrap(shared)
    assert sharify.verify(wrapped) == []
    del shared.sharify_shared  # visible through the wrapper
    assert "not registered in the model" in sharify.verify(wrapped)[0]
    with pytest.raises(sharify.UnsupportedModelError, match="retie the bare model before wrapping"):
        sharify.retie(wrapped)


def test_wrapping_a_sharified_model_trains(process_group):
    """The supported order: sharify, then wrap. One DDP step moves the shared tensor once."""
    torch.manual_seed(0)
    shared = sharify.sharify(NormFreeNet(), example_inputs=EXAMPLE)
    ddp = _ddp(shared)
    holder = shared.sharify_shared.get_submodule(next(iter(sharify.shared_groups(shared))))
    before = holder.weight.detach().clone()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ddp(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, holder.weight) and sharify.verify(ddp) == []


def test_reading_helpers_look_through_data_parallel() -> None:
    """shared_groups, orthogonality_loss, report and load_unshared_state_dict see the model inside a wrapper."""
    torch.manual_seed(0)
    original = NormFreeNet()
    basis = sharify.sharify(original, example_inputs=EXAMPLE, method="basis", shared_rank=8, unique_rank=2)
    wrapped = nn.DataParallel(basis)  # on CPU: forwards to the module
    assert (
        {k: m for k, (_, m) in sharify.shared_groups(wrapped).items()}
        == {k: m for k, (_, m) in sharify.shared_groups(basis).items()}
        != {}
    )
    with torch.no_grad():
        next(iter(sharify.shared_groups(basis).values()))[0].weight.mul_(1.5)
    loss = 10 * sharify.orthogonality_loss(wrapped)
    assert loss.item() > 0.1 and torch.equal(loss, 10 * sharify.orthogonality_loss(basis))
    loss.backward()
    assert all(h.weight.grad is not None for h, _ in sharify.shared_groups(basis).values())
    r, bare = sharify.report(original, wrapped), sharify.report(original, basis)
    assert r.to_dict() == bare.to_dict() and r.groups and r.params_after < r.params_before

    shared = sharify.sharify(original, example_inputs=EXAMPLE, init="random")
    sharify.load_unshared_state_dict(nn.DataParallel(shared), original.state_dict())
    expected = torch.stack([b.conv2.weight for b in original.blocks]).mean(0)
    assert torch.allclose(shared.sharify_shared.blocks.conv2.weight, expected)
