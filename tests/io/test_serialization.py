"""sharify.save / sharify.load / sharify.read_recipe: one-file round trips, mismatches, damaged files."""

from __future__ import annotations

import copy
import json
import os

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import sharify
from sharify.io import reapply
from sharify.io import recipe as recipe_module
from sharify.io.zoo import ModelSource, build_model
from tests.conftest import perturb
from tests.nets import BasicBlock, OneStageNet


def _assert_identical(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    assert {k: m for k, (_, m) in sharify.shared_groups(a).items()} == {
        k: m for k, (_, m) in sharify.shared_groups(b).items()
    }
    assert sharify.verify(b) == []
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


X3 = torch.randn(2, 3, 32, 32)


def test_round_trip_timm_rebuilds_from_recipe(tmp_path):
    shared = perturb(sharify.sharify(timm.create_model("resnet18.tv_in1k", num_classes=5, in_chans=1)))
    with pytest.raises(ValueError, match=r"builds a torchvision\.models\.resnet\.ResNet, not a timm\.models"):
        sharify.save(shared, tmp_path / "r18.safetensors", source="resnet18")  # torchvision's name comes first
    path = sharify.save(shared, tmp_path / "r18.safetensors")
    recipe = sharify.read_recipe(path)
    assert recipe.source == ModelSource("timm", "resnet18.tv_in1k", {"num_classes": 5, "in_chans": 1})
    assert recipe.options is not None and recipe.options["positions"] == ["last_spatial"]
    assert [g.key for g in recipe.groups] == list(sharify.shared_groups(shared))
    assert recipe.groups[0].members == ("layer1.0.conv2", "layer1.1.conv2") and recipe.groups[0].stage == "layer1"

    state = torch.get_rng_state()
    restored = sharify.load(path)
    assert torch.equal(torch.get_rng_state(), state), "load(model=None) must not consume the caller's random numbers"
    assert type(restored) is type(shared)
    assert restored.pretrained_cfg == shared.pretrained_cfg  # the tag selects the data config (mean/std)
    _assert_identical(shared, restored, torch.randn(2, 1, 32, 32))
    # The restored model remembers its source, so it saves again without being told.
    assert sharify.read_recipe(sharify.save(restored, tmp_path / "again.safetensors")).source == recipe.source


def test_round_trip_torchvision_with_explicit_source(tmp_path):
    shared = perturb(sharify.sharify(torchvision.models.resnet18(num_classes=10)))
    with pytest.raises(ValueError, match=r"fc\.weight.*num_classes"):
        sharify.save(shared, tmp_path / "bad.safetensors", source="resnet18")  # 1000 classes: does not rebuild
    assert not (tmp_path / "bad.safetensors").exists()
    path = sharify.save(
        shared, tmp_path / "tv.safetensors", source=ModelSource("torchvision", "resnet18", {"num_classes": 10})
    )
    _assert_identical(shared, sharify.load(path), X3)


def test_build_model_records_the_source(tmp_path):
    model, source = build_model("tv:resnet18", num_classes=3)
    shared = perturb(sharify.sharify(model))
    path = sharify.save(shared, tmp_path / "m.safetensors")
    assert sharify.read_recipe(path).source == source
    _assert_identical(shared, sharify.load(path), X3)


def test_round_trip_user_model_given(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    shared = perturb(sharify.sharify(OneStageNet(), example_inputs=x[:1]))
    path = sharify.save(shared, tmp_path / "tiny.safetensors", metadata={"epoch": "12"})
    recipe = sharify.read_recipe(path)
    assert recipe.source is None and recipe.model_class.endswith("OneStageNet") and recipe.metadata == {"epoch": "12"}
    with pytest.raises(sharify.CheckpointError, match=r"records no source.*model="):
        sharify.load(path)

    fresh = OneStageNet()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    restored = sharify.load(path, fresh)
    _assert_identical(shared, restored, x)
    # The given model is not modified.
    assert not sharify.shared_groups(fresh) and not hasattr(fresh, "sharify_shared")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    # An already sharified model with the same groups also loads.
    _assert_identical(shared, sharify.load(path, sharify.sharify(OneStageNet(), example_inputs=x[:1])), x)
    # Plain safetensors readers see an ordinary state_dict with one key per shared tensor.
    plain = sharify.sharify(OneStageNet(), example_inputs=x[:1])
    plain.load_state_dict(load_file(path))
    _assert_identical(shared, plain, x)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            lambda: OneStageNet(depth=2),
            r"`blocks\.2\.conv2` \(member of shared group `blocks\.conv2`\) is not in the model",
        ),
        (lambda: OneStageNet(width=16), r"`blocks\.0\.conv2\.weight` is \(16, 16, 3, 3\) in the model but the shared"),
        (lambda: OneStageNet(num_classes=7), r"`fc\.weight` has shape \(7, 8\) in the model but \(4, 8\) in the file"),
    ],
    ids=["missing-member", "member-shape", "other-shape"],
)
def test_mismatching_model_names_first_path(tmp_path, model, match):
    shared = sharify.sharify(OneStageNet(), example_inputs=torch.randn(1, 3, 16, 16))
    path = sharify.save(shared, tmp_path / "tiny.safetensors")
    with pytest.raises(sharify.RecipeMismatchError, match=match) as info:
        sharify.load(path, model())
    assert str(path) in str(info.value)


BASIS_OPTIONS = {"method": "basis", "shared_rank": {"blocks": 4}, "unique_rank": {"blocks": 1}}


@pytest.mark.parametrize("options", [BASIS_OPTIONS, {"init": "scaled"}], ids=["basis", "scaled"])
def test_mismatching_model_names_first_path_when_members_are_rewritten(tmp_path, options):
    """Filter-basis and init="scaled" recipes are checked on the unshared model like whole-conv ones."""
    shared = sharify.sharify(OneStageNet(), example_inputs=torch.randn(1, 3, 16, 16), **options)
    path = sharify.save(shared, tmp_path / "tiny.safetensors")
    with pytest.raises(
        sharify.RecipeMismatchError,
        match=r"does not fit the model: `blocks\.2\.conv2` \(member of shared group `blocks\.conv2`\) is not in",
    ):
        sharify.load(path, OneStageNet(depth=2))
    with pytest.raises(sharify.RecipeMismatchError, match=r"`fc\.weight` has shape \(7, 8\) in the model but \(4, 8\)"):
        sharify.load(path, OneStageNet(num_classes=7))


def test_basis_member_of_other_geometry_is_named(tmp_path, monkeypatch):
    x = torch.randn(1, 3, 16, 16)
    path = sharify.save(sharify.sharify(OneStageNet(), example_inputs=x, **BASIS_OPTIONS), tmp_path / "b.safetensors")
    other = OneStageNet()
    for block in other.blocks:
        block.conv2 = nn.Conv2d(8, 8, 5, padding=2)
    with pytest.raises(
        sharify.RecipeMismatchError,
        match=r"`blocks\.0\.conv2\.weight` is \(8, 8, 5, 5\) in the model but its filters do not fit the shared "
        r"basis `sharify_shared\.blocks\.conv2\.weight`, which is \(4, 8, 3, 3\) in the file",
    ):
        sharify.load(path, other)
    # re-applying the recipe makes other groups: the message names the first group that differs
    real = reapply.sharify
    monkeypatch.setattr(reapply, "sharify", lambda m, **o: real(m, **{**o, "skip_first_block": True}))
    with pytest.raises(
        sharify.RecipeMismatchError,
        match=r"it makes other groups \(first: group `blocks\.conv2` has other members than in the file, "
        r"at `blocks\.0\.conv2\.shared`\)",
    ):
        sharify.load(path, OneStageNet())


# Defined here, not in tests/nets.py: the next test is about the analysis inputs and leaf modules these two need.
class PositionalNet(nn.Module):
    """Takes only 8x8 inputs (a learned position map is added after the stem): the default 224 px analysis fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, 8, 8, 8))
        self.blocks = nn.Sequential(BasicBlock(8), BasicBlock(8), BasicBlock(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x) + self.pos).mean((2, 3)))


class OpaqueBlock(BasicBlock):
    """A block the user wants left alone: passed as leaf_modules=[OpaqueBlock]."""


def test_recipe_records_the_analysis_inputs_and_leaf_modules(tmp_path):
    """A filter-basis model needs the analysis repeated on load (its groups cannot be applied directly):
    the recipe records the example input shapes and the leaf module paths and passes them back."""
    x = torch.randn(2, 3, 8, 8)
    assert "shape propagation stopped" in sharify.plan(PositionalNet()).empty_reason()  # the default 224 px
    shared = perturb(sharify.sharify(PositionalNet(), example_inputs=x[:1], **BASIS_OPTIONS))
    path = sharify.save(shared, tmp_path / "positional.safetensors")
    recipe = sharify.read_recipe(path)
    assert recipe.analysis == {"input_shapes": [[1, 3, 8, 8]], "input_dtypes": ["float32"], "leaf_modules": []}
    _assert_identical(shared, sharify.load(path, PositionalNet()), x)

    tiny = OneStageNet()
    tiny.blocks[1] = OpaqueBlock(8)
    options = {"method": "basis", "shared_rank": 8, "unique_rank": 1}
    shared = perturb(sharify.sharify(tiny, example_inputs=X3[:1], leaf_modules=[OpaqueBlock], **options))
    (group,) = sharify.shared_groups(shared).values()
    assert group[1] == ["blocks.0.conv2.shared", "blocks.2.conv2.shared"]  # the opaque block is not shared
    path = sharify.save(shared, tmp_path / "leaf.safetensors")
    assert sharify.read_recipe(path).analysis["leaf_modules"] == ["blocks.1"]
    fresh = OneStageNet()
    fresh.blocks[1] = OpaqueBlock(8)
    _assert_identical(shared, sharify.load(path, fresh), X3)

    with pytest.raises(ValueError, match="analysis entry is malformed"):
        recipe_module.Recipe.from_json(json.dumps({"format": 1, "groups": [], "analysis": {"input_shapes": "big"}}))


def test_mismatching_sharified_model(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    path = sharify.save(sharify.sharify(OneStageNet(), example_inputs=x), tmp_path / "tiny.safetensors")
    other = sharify.sharify(OneStageNet(), example_inputs=x, skip_first_block=True)
    with pytest.raises(
        sharify.RecipeMismatchError, match=r"group `blocks\.conv2` has other members .*`blocks\.0\.conv2`"
    ):
        sharify.load(path, other)


def test_strict_false_skips_keys_only_one_side_has(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    shared = perturb(sharify.sharify(OneStageNet(), example_inputs=x[:1]))
    path = sharify.save(shared, tmp_path / "tiny.safetensors")
    bigger = OneStageNet()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(sharify.RecipeMismatchError, match=r"`extra\.weight` is in the model but not in the file"):
        sharify.load(path, bigger)
    restored = sharify.load(path, bigger, strict=False)
    assert torch.equal(restored.extra.weight, bigger.extra.weight)
    _assert_identical(shared, sharify.load(path, OneStageNet(), strict=False), x)


def _untraceable(model, **options):
    raise sharify.UntraceableError("cannot trace")


def test_fallback_when_sharify_makes_other_groups(tmp_path, monkeypatch):
    """Re-applying the recipe stays exact when re-running sharify fails or shares differently
    (e.g. the model was analysed with example inputs or leaf modules the recipe does not record)."""
    x = torch.randn(2, 3, 16, 16)
    shared = perturb(sharify.sharify(OneStageNet(), example_inputs=x[:1]))
    path = sharify.save(shared, tmp_path / "tiny.safetensors")
    real = reapply.sharify

    def other_groups(model, **options):
        return real(model, **{**options, "skip_first_block": True, "example_inputs": x[:1]})

    monkeypatch.setattr(reapply, "sharify", other_groups)
    _assert_identical(shared, sharify.load(path, OneStageNet()), x)

    monkeypatch.setattr(reapply, "sharify", _untraceable)
    _assert_identical(shared, sharify.load(path, OneStageNet()), x)


def test_bf16_model_keeps_its_dtype(tmp_path):
    shared = perturb(sharify.sharify(timm.create_model("resnet18", num_classes=3))).to(torch.bfloat16)
    restored = sharify.load(sharify.save(shared, tmp_path / "bf16.safetensors"))
    assert restored.sharify_shared.layer1.conv2.weight.dtype == torch.bfloat16
    _assert_identical(shared, restored, X3.to(torch.bfloat16))


def test_unshared_model_round_trip(tmp_path):
    model = perturb(timm.create_model("resnet18", num_classes=3))
    recipe = sharify.read_recipe(sharify.save(model, tmp_path / "plain.safetensors"))
    assert recipe.options is None and recipe.groups == ()
    restored = sharify.load(tmp_path / "plain.safetensors")
    assert not sharify.shared_groups(restored)
    _assert_identical(model, restored, X3)


def test_version_mismatch_warns(tmp_path, monkeypatch):
    shared = sharify.sharify(OneStageNet(), example_inputs=torch.randn(1, 3, 16, 16))
    monkeypatch.setattr(recipe_module, "__version__", "0.0.1")  # the version the recipe records
    path = sharify.save(shared, tmp_path / "old.safetensors")
    monkeypatch.undo()
    assert sharify.read_recipe(path).version == "0.0.1"
    with pytest.warns(UserWarning, match=rf"written by sharify 0\.0\.1, this is sharify {sharify.__version__}"):
        sharify.load(path, OneStageNet())


@pytest.fixture
def saved(tmp_path):
    shared = sharify.sharify(OneStageNet(), example_inputs=torch.randn(1, 3, 16, 16))
    return sharify.save(shared, tmp_path / "tiny.safetensors")


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        sharify.CheckpointError, match=r"tiny\.safetensors is not a readable safetensors file.*truncated"
    ):
        sharify.load(saved, OneStageNet())
    saved.write_bytes(data[:5])
    with pytest.raises(sharify.CheckpointError, match="not a readable safetensors file"):
        sharify.read_recipe(saved)


def test_corrupted_tensor_bytes_are_detected(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor: the header stays valid, only the checksum can tell
    saved.write_bytes(bytes(data))
    with pytest.raises(sharify.CheckpointError, match=r"tiny\.safetensors is corrupted: tensor `.+` does not match"):
        sharify.load(saved, OneStageNet())


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(sharify.CheckpointError, match=r"junk\.safetensors is not a readable safetensors file"):
        sharify.load(junk)
    pickled = tmp_path / "model.pt"
    torch.save(OneStageNet().state_dict(), pickled)
    with pytest.raises(sharify.CheckpointError, match=r"model\.pt is not a readable safetensors file"):
        sharify.load(pickled, OneStageNet())
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        sharify.load(tmp_path / "nope.safetensors")


def test_file_without_recipe_says_how_to_load_it(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(OneStageNet().state_dict(), plain)
    with pytest.raises(
        sharify.CheckpointError, match=r"without a sharify recipe.*load_state_dict\(safetensors\.torch\.load_file"
    ):
        sharify.load(plain, OneStageNet())


def test_damaged_or_newer_recipe(tmp_path, saved):
    tensors = load_file(saved)
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, damaged, metadata={"sharify": "{not json"})
    with pytest.raises(sharify.CheckpointError, match=r"damaged\.safetensors has a damaged sharify recipe"):
        sharify.read_recipe(damaged)
    newer = json.loads(sharify.read_recipe(saved).to_json())
    newer["format"] = 99
    save_file(tensors, damaged, metadata={"sharify": json.dumps(newer)})
    with pytest.raises(sharify.CheckpointError, match=r"format 99, newer than this sharify reads.*upgrade"):
        sharify.load(damaged, OneStageNet())


def test_failed_save_leaves_the_old_file(saved, monkeypatch):
    before = saved.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("sharify.io.serialization.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        sharify.save(sharify.sharify(OneStageNet(), example_inputs=torch.randn(1, 3, 16, 16)), saved)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_bad_save_arguments(tmp_path):
    shared = sharify.sharify(OneStageNet(), example_inputs=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="'sharify' is reserved"):
        sharify.save(shared, tmp_path / "a.safetensors", metadata={"sharify": "x"})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        sharify.save(shared, tmp_path / "a.safetensors", metadata={"epoch": 3})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module"):
        sharify.save(shared.state_dict(), tmp_path / "a.safetensors")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ModelSource"):
        sharify.save(shared, tmp_path / "a.safetensors", source=3)  # type: ignore[arg-type]
    fused = copy.deepcopy(shared)
    for block in fused.blocks:  # un-shares every member of the only group, as conv-BN fusion helpers do
        block.conv2.weight = nn.Parameter(block.conv2.weight.detach().clone())
    with pytest.raises(ValueError, match=r"shared group `blocks\.conv2` has no member convs left"):
        sharify.save(fused, tmp_path / "a.safetensors")
    with torch.device("meta"):
        meta = sharify.sharify(OneStageNet(), example_inputs=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        sharify.save(meta, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_detected_source_that_does_not_rebuild_is_dropped(tmp_path):
    model = timm.create_model("resnet18", num_classes=5)
    model.fc = nn.Linear(512, 2)  # replaced by hand: num_classes still says 5
    shared = sharify.sharify(model)
    with pytest.warns(UserWarning, match=r"looks like timm:resnet18\.a1_in1k.*saving without a source"):
        path = sharify.save(shared, tmp_path / "m.safetensors")
    assert sharify.read_recipe(path).source is None
    copy_of_architecture = copy.deepcopy(model)
    _assert_identical(shared, sharify.load(path, copy_of_architecture), X3)


def test_save_refuses_broken_ties(tmp_path):
    shared = sharify.sharify(OneStageNet(), example_inputs=torch.randn(1, 3, 16, 16))
    shared.blocks[1] = copy.deepcopy(shared.blocks[1])
    with pytest.raises(sharify.TieError, match=r"`blocks\.1\.conv2` read a copy.*sharify\.retie"):
        sharify.save(shared, tmp_path / "a.safetensors")
    sharify.retie(shared)
    sharify.save(shared, tmp_path / "a.safetensors")


def test_round_trip_filter_basis(tmp_path):
    """method="basis" rewrites the member convs into BasisConv2d modules: the recipe re-runs sharify with the
    recorded options (init="svd" included) and checks the result against the file."""
    x = torch.randn(2, 3, 16, 16)
    options = {"method": "basis", "shared_rank": {"blocks": 4}, "unique_rank": {"blocks": 1}, "init": "svd"}
    shared = perturb(sharify.sharify(OneStageNet(), example_inputs=x[:1], **options))
    path = sharify.save(shared, tmp_path / "basis.safetensors")
    (group,) = sharify.read_recipe(path).groups
    assert group.method == "basis" and group.members[0] == "blocks.0.conv2.shared" and not group.whole_conv
    _assert_identical(shared, sharify.load(path, OneStageNet()), x)
    with pytest.raises(
        sharify.RecipeMismatchError, match=r"`stem\.weight` has shape \(16, 3, 3, 3\) in the model but \(8, 3, 3, 3\)"
    ):
        sharify.load(path, OneStageNet(width=16))

    timm_shared = perturb(
        sharify.sharify(timm.create_model("resnet18", num_classes=3), method="basis", shared_rank=8, unique_rank=1)
    )
    _assert_identical(timm_shared, sharify.load(sharify.save(timm_shared, tmp_path / "r18.safetensors")), X3)


def test_round_trip_scaled_init(tmp_path, monkeypatch):
    """init="scaled" adds per-member gains (here: no BatchNorm after conv2 absorbs them); the file holds them."""
    x = torch.randn(2, 3, 16, 16)
    shared = perturb(sharify.sharify(OneStageNet(), example_inputs=x[:1], init="scaled"))
    path = sharify.save(shared, tmp_path / "scaled.safetensors")
    assert "blocks.0.conv2.shared_gain" in load_file(path)
    _assert_identical(shared, sharify.load(path, OneStageNet()), x)

    # The gains' placement comes from the analysis, so the recorded groups alone cannot rebuild the model.
    monkeypatch.setattr(reapply, "sharify", _untraceable)
    with pytest.raises(
        sharify.RecipeMismatchError, match=r"does not rebuild the file's groups: it fails \(cannot trace\)"
    ):
        sharify.load(path, OneStageNet())


def test_round_trip_relaxed_sharing_also_from_the_recorded_groups(tmp_path, monkeypatch):
    """delta_rank members own their deltas; a budget's chosen ranks are recorded, so load rebuilds the same
    shapes, also when the analysis cannot be repeated and the recorded groups are applied directly."""
    x = torch.randn(2, 3, 16, 16)
    shared = perturb(sharify.sharify(OneStageNet(), example_inputs=x[:1], param_budget=0.95))
    recipe_ranks = shared.sharify_shared.options["delta_rank"]
    assert recipe_ranks and shared.sharify_shared.options["param_budget"] is None
    path = sharify.save(shared, tmp_path / "relaxed.safetensors")
    assert "blocks.0.conv2.delta_a" in load_file(path)
    assert sharify.read_recipe(path).options["delta_rank"] == recipe_ranks
    _assert_identical(shared, sharify.load(path, OneStageNet()), x)
    monkeypatch.setattr(reapply, "sharify", _untraceable)
    _assert_identical(shared, sharify.load(path, OneStageNet()), x)
