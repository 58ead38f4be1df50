"""Transformer and MLP blocks: residual branches of ``nn.Linear`` layers (timm ViT/DeiT/Swin/Mixer, Hugging Face
ViT/Swin), the Linear selectors, ``group_size``, the ``minivit`` preset, and alignment of heads and MLP units."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import sharify
from sharify.analysis import analyse
from sharify.rewrite.align import ChannelSlot, alignment
from tests.rewrite.test_wrappers import process_group as process_group  # the fixture

timm = pytest.importorskip("timm")


def _vit(depth: int = 4, **kw: object) -> nn.Module:
    """A small timm ViT (32 px, patch 8: 17 tokens of width 192, 3 heads) in eval mode."""
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": depth, **kw}
    return timm.create_model("vit_tiny_patch16_224", **kw).eval()


X32 = torch.randn(2, 3, 32, 32)


def test_blocks_of_linear_branches_are_found_and_chained_through_reshapes() -> None:
    vit = analyse(_vit(depth=3), (X32,))
    assert [(s.path, len(s.blocks)) for s in vit.stages] == [("blocks", 6)]
    attn, mlp = vit.blocks[:2]
    assert (attn.linears, attn.attention) == (("blocks.0.attn.qkv", "blocks.0.attn.proj"), True)
    assert (mlp.linears, mlp.attention) == (("blocks.0.mlp.fc1", "blocks.0.mlp.fc2"), False)
    # Swin adds attention on (N, H, W, C) and MLPs on (N, H*W, C): one stage per resolution all the same
    with torch.device("meta"):
        swin = timm.create_model("swin_tiny_patch4_window7_224")
    stages = analyse(swin).stages
    expected = [(f"layers.{i}.blocks", 2 * d) for i, d in enumerate((2, 2, 6, 2))]
    assert [(s.path, len(s.blocks)) for s in stages] == expected


@pytest.mark.parametrize(
    ("name", "published"),
    [("deit_tiny_patch16_224", 3e6), ("deit_small_patch16_224", 11e6), ("deit_base_patch16_224", 44e6)],
)
def test_minivit_preset_matches_the_published_mini_deit_sizes(name: str, published: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    plan = sharify.plan(model, preset="minivit")
    # 12 blocks, each position shared by runs of two: 6 unique blocks; the published sizes are rounded to 1M
    assert len(plan.groups) == 4 * 6 and all(len(g.members) == 2 for g in plan.groups)
    assert abs(plan.params_after - published) <= 0.1 * published
    if name == "deit_base_patch16_224":
        assert abs(plan.params_after / published - 1) < 0.03  # the bar: 44.06M


def test_group_size_splits_a_stage_into_runs() -> None:
    model = _vit(depth=5)
    runs = sharify.plan(model, example_inputs=X32, positions=("mlp",), group_size=2)
    assert [g.members for g in runs.groups if g.position == "mlp0"] == [
        ("blocks.0.mlp.fc1", "blocks.1.mlp.fc1"),
        ("blocks.2.mlp.fc1", "blocks.3.mlp.fc1"),
    ]  # block 4 is a run of one: unshared
    whole = sharify.plan(model, example_inputs=X32, positions=("attn",))
    assert [(g.position, len(g.members)) for g in whole.groups] == [("attn0", 5), ("attn1", 5)]
    fc = model.blocks[0].mlp.fc1
    member = fc.weight.numel() + fc.bias.numel()
    assert runs.params_before - runs.params_after == 2 * member + 2 * (fc.weight.numel() + 192)  # fc1, fc2 runs


def test_a_plain_call_on_a_vit_refuses_and_names_the_preset() -> None:
    with pytest.raises(sharify.NothingToShareError, match=r"preset='minivit'.*positions=\('all_linear',\)"):
        sharify.sharify(_vit(), example_inputs=X32)


def test_bad_linear_options_are_refused() -> None:
    with pytest.raises(ValueError, match="group_size=1 shares nothing"):
        sharify.SharingOptions(group_size=1)
    with pytest.raises(TypeError, match="group_size must be an int"):
        sharify.SharingOptions(group_size=2.0)
    with pytest.raises(ValueError, match="did you mean 'attn'"):
        sharify.SharingOptions(positions=("atn",))
    model = _vit()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"holds an nn\.Linear"):
        sharify.sharify(model, example_inputs=X32, positions=("mlp",), method="basis", shared_rank=8, unique_rank=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _train_step(shared: nn.Module, x: torch.Tensor) -> None:
    """One SGD step on a fresh random head (timm zero-inits some heads, which would stop every gradient)."""
    head = shared.get_classifier()
    nn.init.normal_(head.weight, std=0.02)
    shared.train()
    shared(x).logsumexp(-1).sum().backward()
    for key, (holder, members) in sharify.shared_groups(shared).items():
        assert len(members) >= 2
        for p in holder.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, key
    torch.optim.SGD(shared.parameters(), lr=0.01).step()


@pytest.mark.parametrize(
    ("name", "kw", "size"),
    [
        ("vit_small_patch16_224", {"img_size": 64}, 64),
        ("swin_tiny_patch4_window7_224", {}, 224),
        ("mixer_b16_224", {"img_size": 64}, 64),
    ],
)
def test_timm_transformers_share_with_one_call_train_and_round_trip(
    name: str, kw: dict, size: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, size, size)
    shared = sharify.sharify(model, preset="minivit")
    report = sharify.report(model, shared)
    assert 0.45 < 1 - report.params_after / report.params_before < 0.55  # about half, as MiniViT
    shared.eval()
    assert shared(x).shape == model(x).shape == (2, 10)
    sharify.save(shared, tmp_path / "m.safetensors")
    loaded = sharify.load(tmp_path / "m.safetensors").eval()
    torch.testing.assert_close(loaded(x), shared(x))
    assert set(sharify.shared_groups(loaded)) == set(sharify.shared_groups(shared))
    _train_step(shared, x)


def test_align_keeps_a_vit_unchanged_and_finds_heads_and_hidden_units() -> None:
    model = _vit()
    plan = sharify.plan(model, example_inputs=X32, preset="minivit", align=True)
    qkv = next(g for g in plan.groups if g.position == "attn0")
    fc1 = next(g for g in plan.groups if g.position == "mlp0")
    assert qkv.slots[0] == (None, ChannelSlot("blocks.0.attn.qkv", "blocks.0.attn.proj", (), heads=3, chunks=3))
    assert fc1.slots[1] == (None, ChannelSlot("blocks.1.mlp.fc1", "blocks.1.mlp.fc2"))
    modules = dict(model.named_modules())
    values, orders = alignment([(g.members, g.slots) for g in plan.groups], lambda p, n: getattr(modules[p], n, None))
    moved = {path.split(".", 2)[2] for path in orders}
    assert {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"} <= moved  # random blocks: heads and units move
    aligned = copy.deepcopy(model)
    with torch.no_grad():
        for path, tensors in values.items():
            for name, value in tensors.items():
                getattr(aligned.get_submodule(path), name).copy_(value)
    torch.testing.assert_close(aligned(X32), model(X32), rtol=0, atol=1e-5)


def _permute_block(block: nn.Module, heads: torch.Tensor, units: torch.Tensor) -> None:
    """The function-preserving permutation of a timm ViT block's heads and MLP hidden units."""
    attn, mlp = block.attn, block.mlp
    dim = attn.proj.in_features // len(heads)
    cols = (heads[:, None] * dim + torch.arange(dim)).flatten()
    rows = torch.cat([cols + t * attn.proj.in_features for t in range(3)])
    with torch.no_grad():
        attn.qkv.weight.copy_(attn.qkv.weight[rows])
        attn.qkv.bias.copy_(attn.qkv.bias[rows])
        attn.proj.weight.copy_(attn.proj.weight[:, cols])
        mlp.fc1.weight.copy_(mlp.fc1.weight[units])
        mlp.fc1.bias.copy_(mlp.fc1.bias[units])
        mlp.fc2.weight.copy_(mlp.fc2.weight[:, units])


def test_align_recovers_blocks_that_are_permuted_copies_exactly() -> None:
    # Block 1 becomes block 0 with its heads and hidden units shuffled: the model computes what it did with two
    # equal blocks; averaging unaligned mixes unrelated heads, aligning first shares exactly.
    model = _vit(depth=2)
    model.blocks[1].load_state_dict(model.blocks[0].state_dict())
    expected = model(X32)
    g = torch.Generator().manual_seed(3)
    _permute_block(model.blocks[1], torch.randperm(3, generator=g), torch.randperm(768, generator=g))
    torch.testing.assert_close(model(X32), expected, rtol=0, atol=1e-5)
    plain = sharify.sharify(model, example_inputs=X32, preset="minivit")
    aligned = sharify.sharify(model, example_inputs=X32, preset="minivit", align=True)
    assert (plain(X32) - expected).abs().max() > 1e-2
    torch.testing.assert_close(aligned(X32), expected, rtol=0, atol=1e-5)


def test_heads_with_a_bias_per_head_are_not_moved() -> None:
    # Swin adds a relative position bias per head inside its attention: permuting heads would need the table
    # permuted too, so heads are not free there (its MLP hidden units are).
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(2,), num_heads=(3,), embed_dim=48).eval()
    x = torch.randn(1, 3, 224, 224)
    plan = sharify.plan(swin, example_inputs=x, preset="minivit", align=True)
    slots = {g.position: g.slots[0] for g in plan.groups}
    assert slots["attn0"] == (None, None) and slots["mlp0"][1] is not None
    aligned = sharify.sharify(swin, example_inputs=x, preset="minivit", align=True, delta_rank="full")
    torch.testing.assert_close(aligned(x), swin(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["average", "scaled", "first"])
def test_full_rank_deltas_reproduce_a_vit(init: str) -> None:
    model = _vit(depth=2, embed_dim=64, num_heads=4)
    shared = sharify.sharify(model, example_inputs=X32, preset="minivit", init=init, align=True, delta_rank="full")
    torch.testing.assert_close(shared(X32), model(X32), rtol=1e-4, atol=1e-4)
    unshared = sharify.unshare(shared)
    assert not sharify.shared_groups(unshared)
    torch.testing.assert_close(unshared(X32), shared(X32))


def test_a_budget_spends_ranks_on_linear_members() -> None:
    model = _vit(depth=2, embed_dim=64, num_heads=4)
    budget = sharify.sharify(model, example_inputs=X32, preset="minivit", param_budget=0.8)
    report = sharify.report(model, budget)
    assert 0.75 * report.params_before < report.params_after <= 0.8 * report.params_before
    assert any(g.delta_rank > 0 for g in report.groups)


def test_hugging_face_vit_and_swin(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    vit_config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=5,
    )  # fmt: skip
    swin_config = transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=5
    )
    vit = transformers.ViTForImageClassification(vit_config)
    for model in (vit, transformers.SwinForImageClassification(swin_config)):
        model.eval()
        shared = sharify.sharify(model, example_inputs=X32, preset="minivit", align=True, delta_rank="full")
        assert type(shared) is type(model)
        torch.testing.assert_close(shared(X32).logits, model(X32).logits, rtol=1e-4, atol=1e-4)
        plain = sharify.sharify(model, example_inputs=X32, preset="minivit")
        report = sharify.report(model, plain)
        assert report.params_after < 0.75 * report.params_before
        sharify.save(plain, tmp_path / "hf.safetensors")
        loaded = sharify.load(tmp_path / "hf.safetensors", model=type(model)(model.config)).eval()
        torch.testing.assert_close(loaded(X32).logits, plain(X32).logits)


def test_ddp_compile_verify_and_retie_on_linear_members(process_group) -> None:
    shared = sharify.sharify(_vit(), example_inputs=X32, preset="minivit", delta_rank=4)
    torch.testing.assert_close(torch.compile(shared)(X32), shared(X32), rtol=1e-4, atol=1e-5)
    nn.init.normal_(shared.head.weight, std=0.02)
    ddp = nn.parallel.DistributedDataParallel(shared)
    before = {n: p.detach().clone() for n, p in shared.named_parameters()}
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ddp(X32).square().mean().backward()
    opt.step()
    moved = {n for n, p in shared.named_parameters() if not torch.equal(before[n], p)}
    assert {f"sharify_shared.blocks.0.{k}.weight" for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} <= moved
    assert all(n in moved for n in before if n.endswith("delta_a"))
    assert sharify.verify(ddp) == []
    # a block copied by user code (a deep copy breaks the tie): verify names it, retie repairs it
    shared.blocks[1] = copy.deepcopy(shared.blocks[1])
    assert any("blocks.1.attn.qkv" in problem for problem in sharify.verify(shared))
    sharify.retie(shared)
    assert sharify.verify(shared) == []


def test_onnx_export_stores_each_shared_linear_once(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    from sharify.deploy.onnx import check_onnx, export_onnx

    shared = sharify.sharify(_vit(depth=2), example_inputs=X32, preset="minivit").eval()
    check = check_onnx(shared, export_onnx(shared, tmp_path / "vit.onnx", X32), X32)
    assert len(check.tensors) == 4 and all(len(t.exact) == 1 for t in check.tensors)
    assert check.stored_elements <= 1.02 * (check.params + check.buffers)


def test_finetune_command_line_on_a_timm_vit(tmp_path: Path) -> None:
    from sharify.cli import main
    from tests.fake_data import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=3, train=4, val=2)  # 12 px images: resized to 224 for a ViT
    out = tmp_path / "run"
    args = ["finetune", "--model", "timm:deit_tiny_patch16_224", "--preset", "minivit", "--align", "--data", str(data)]
    assert main([*args, "--out", str(out), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--quiet"]) == 0
    loaded = sharify.load(out / "model.safetensors")
    assert len(sharify.shared_groups(loaded)) == 24 and loaded(torch.randn(1, 3, 224, 224)).shape == (1, 3)
