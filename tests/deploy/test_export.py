"""torch.export keeps each shared tensor once (issue 17): in the ExportedProgram, in its .pt2 package and, in a slow
test, in an AOTInductor package; the checks find the copies of a model that does not keep the sharing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval

import sharify
from sharify.deploy import check_export, shared_constants
from sharify.deploy.export import archive_copies
from tests.conftest import perturb
from tests.nets import cifar_resnet

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def shared() -> nn.Module:
    torch.manual_seed(0)
    return sharify.sharify(perturb(cifar_resnet(14, width=8)), example_inputs=X)


def test_program_and_package_store_each_shared_tensor_once(shared: nn.Module, tmp_path: Path) -> None:
    shared.train()
    check = check_export(shared, path=tmp_path / "m.pt2")  # inputs: the shapes sharify's analysis used
    assert shared.training  # its mode restored
    keys = list(sharify.shared_groups(shared))
    for found in (check.program, check.package, check.archive):
        assert [(c.key, c.count) for c in found] == [(k, 1) for k in keys]
    # the program lifts the holder's parameter itself; the archive holds it in one entry
    assert all(c.exact == (c.name,) for c in check.program + check.package)
    assert all(len(c.exact) == 1 and "/data/weights/" in c.exact[0] for c in check.archive)
    path = tmp_path / "m.pt2"
    assert check.path == str(path) and check.package_bytes == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]
    assert check.max_abs_diff <= check.tolerance
    # the package runs any batch size (dynamic_batch=True) and computes what the model does in eval mode
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(shared).eval()(x)
        torch.testing.assert_close(torch.export.load(path).module()(x), expected)


def test_basis_model(tmp_path: Path) -> None:
    model = perturb(cifar_resnet(20, width=8))
    shared = sharify.sharify(model, example_inputs=X, preset="dsfb-basis", shared_rank=4, unique_rank=1)
    check = check_export(shared, X, dynamic_batch=False)
    assert len(check.archive) == 2 * 3 and {c.count for c in check.program + check.package + check.archive} == {1}
    assert check.path is None and list(tmp_path.iterdir()) == []


def test_copies_of_a_fused_model_are_found(shared: nn.Module, tmp_path: Path) -> None:
    # torch.fx's `fuse` folds a BatchNorm only into a conv of class nn.Conv2d itself: the members stay shared
    program = torch.export.export(fuse(copy.deepcopy(shared).eval()), (X,))
    assert {c.count for c in shared_constants(program, shared)} == {1}
    # folding each member's BatchNorm gives it its own weight (un-sharing it): a copy scaled per channel each, and
    # the holder's tensor, read by no conv now, is still a parameter of the module (so of the program)
    fused = copy.deepcopy(shared).eval()
    for block in (*fused.layer1, *fused.layer2, *fused.layer3):
        block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
    found = shared_constants(torch.export.export(fused, (X,)), shared)
    members = {k: len(m) for k, (_, m) in sharify.shared_groups(shared).items()}
    assert {c.key: len(c.scaled) for c in found} == members and all(c.exact == (c.name,) for c in found)
    # sharify.unshare gives each member an exact copy: in the program and in the bytes of the .pt2 archive
    program = torch.export.export(sharify.unshare(shared).eval(), (X,))
    assert {c.key: len(c.exact) for c in shared_constants(program, shared)} == members
    torch.export.save(program, tmp_path / "unshared.pt2")
    assert {c.key: c.count for c in archive_copies(shared, tmp_path / "unshared.pt2")} == members


def test_check_fails_naming_the_copies(shared: nn.Module, tmp_path: Path) -> None:
    # A model whose shared weight is read as a fresh copy by each member (here: a member's own parameter equal to it)
    model = copy.deepcopy(shared)
    member = model.get_submodule(sharify.shared_groups(model)["layer1.conv2"][1][1])
    member.weight = nn.Parameter(member.weight.detach().clone())  # assignment un-shares this member
    with pytest.raises(sharify.ExportError, match=r"`sharify_shared.layer1.conv2.weight` \(8x8x3x3\) 2 times"):
        check_export(model, X, path=tmp_path / "m.pt2", dynamic_batch=False)
    assert list(tmp_path.iterdir()) == []  # a package that fails the check is not written


@pytest.mark.slow
def test_aoti_package_stores_each_shared_tensor_once(shared: nn.Module) -> None:
    check = check_export(shared, X, dynamic_batch=False, aoti=True)  # a C++ build: ~30 s to minutes on a small CPU
    assert check.aoti is not None and {c.count for c in check.aoti} == {1}
    assert check.aoti_bytes is not None and check.aoti_bytes > 0
