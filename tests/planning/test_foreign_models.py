"""Analysis of model code written elsewhere (issue 14): vector additions beside residual blocks, convs with
parametrized or already tied weights, and the argument checks of ``sharify``/``plan``/``apply_plan``."""

from __future__ import annotations

import contextlib
import copy
import re
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import sharify
from tests.conftest import state_equal
from tests.foreign_nets import CifarResNet

X = torch.randn(2, 3, 32, 32)

# Two stages of three CIFAR basic blocks (8 then 16 channels, no conv bias): ShaResNet shares each stage's three
# conv2 (the downsampling block's conv2 is 16->16 stride 1 like the others), saving two of three in each stage.
EXPECTED_SAVED = 2 * (8 * 8 * 9) + 2 * (16 * 16 * 9)
EXPECTED_MEMBERS = [tuple(f"layers.{i}.{b}.conv2" for b in range(3)) for i in range(2)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- 1. additions that are not residual blocks ------------------------------------------------------------------


@pytest.mark.parametrize("context", [None, "gate", "sum", "pooled"])
def test_vector_additions_across_blocks_neither_form_blocks_nor_split_stages(context: str | None) -> None:
    model = CifarResNet(context=context).eval()
    assert model(X).shape == (2, 10)
    plan = sharify.plan(model, example_inputs=X)
    assert [(s.path, len(s.blocks)) for s in plan.stages] == [("layers.0", 3), ("layers.1", 3)]
    assert [g.members for g in plan.groups] == EXPECTED_MEMBERS
    assert plan.params_saved == EXPECTED_SAVED
    shared = sharify.sharify(model, example_inputs=X)
    assert n_params(shared) == n_params(model) - EXPECTED_SAVED == plan.params_after


def test_blocks_at_one_position_are_still_blocks() -> None:
    # resnet18 on 32x32: layer4 runs at 1x1 (its shortcut a strided conv, then identities); resnet18d's shortcut
    # pools 2x2 to 1x1, but its branch reduces with a conv, so only one side is pooled.
    for model in (torchvision.models.resnet18(), timm.create_model("resnet18d")):
        plan = sharify.plan(model, example_inputs=X[:1])
        assert plan.stages[-1].shape == (1, 512, 1, 1)
        assert [g.stage for g in plan.groups] == ["layer1", "layer2", "layer3", "layer4"]


# --- 2. convs whose weight is not a plain Parameter ---------------------------------------------------------------

KINDS = {
    "weight_norm": (
        nn.utils.parametrizations.weight_norm,
        r"parametrized \(WeightNorm, torch\.nn\.utils\.parametrize\)",
    ),
    "spectral_norm": (
        nn.utils.parametrizations.spectral_norm,
        r"parametrized \(SpectralNorm, torch\.nn\.utils\.parametrize\)",
    ),
    "legacy_weight_norm": (
        nn.utils.weight_norm,
        r"forward pre-hook \(torch\.nn\.utils\.weight_norm\).*remove_weight_norm",
    ),
}


def _parametrized(kind: str, blocks: list[str]) -> CifarResNet:
    model = CifarResNet()
    for path in blocks:
        block = model.get_submodule(path)
        with pytest.warns(FutureWarning) if kind == "legacy_weight_norm" else contextlib.nullcontext():
            block.conv2 = KINDS[kind][0](block.conv2)
    model(X)  # the legacy hooks leave a computed (non-leaf) weight on the conv, which deepcopy refuses
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_a_parametrized_member_is_left_out_with_a_note_and_the_rest_shared(kind: str) -> None:
    model = _parametrized(kind, ["layers.0.1"])
    plan = sharify.plan(model, example_inputs=X)
    assert [g.members for g in plan.groups] == [("layers.0.0.conv2", "layers.0.2.conv2"), EXPECTED_MEMBERS[1]]
    assert plan.params_saved == 8 * 8 * 9 + 2 * (16 * 16 * 9)
    (note,) = plan.notes
    assert note.startswith("`layers.0.1.conv2` (picked by 'last_spatial') is not shared: the weight is")
    assert "nothing is shared in its place" in note
    assert f"note: {note}" in str(plan)
    assert re.search(KINDS[kind][1], note)
    shared = sharify.sharify(model, example_inputs=X)
    assert n_params(shared) == plan.params_after
    kept = shared.layers[0][1].conv2
    assert not sharify.is_shared_conv(kept) and type(kept) is type(model.layers[0][1].conv2)
    assert torch.equal(kept.weight, model.layers[0][1].conv2.weight)
    assert not any(sharify.is_shared_conv(m) for m in model.modules()), "the caller's model was changed"


@pytest.mark.parametrize("kind", KINDS)
def test_parametrized_members_everywhere_are_refused_naming_each_conv(kind: str) -> None:
    blocks = [f"layers.{i}.{b}" for i in range(2) for b in range(3)]
    model = _parametrized(kind, blocks)
    names = ", ".join(rf"`{b}\.conv2`" for b in blocks)
    with pytest.raises(sharify.NothingToShareError, match=rf"{names} \(picked by 'last_spatial'\) are not shared: "):
        sharify.sharify(model, example_inputs=X)
    with pytest.raises(sharify.NothingToShareError, match=KINDS[kind][1]):
        sharify.sharify(model, example_inputs=X)
    # The other convs are plain: the refusal's suggestion works.
    assert sharify.plan(model, example_inputs=X, positions="first").groups


# --- 3. convs the model's authors already tied -------------------------------------------------------------------


def test_a_conv_tied_by_parameter_is_left_out_with_a_note_and_counted_once() -> None:
    model = CifarResNet()
    plain = n_params(model)
    model.layers[0][1].conv2.weight = model.layers[0][0].conv2.weight
    plan = sharify.plan(model, example_inputs=X)
    assert plan.params_before == n_params(model) == plain - 8 * 8 * 9
    # Stage 0: the rule picks two tied convs and leaves them out; the third conv2 alone forms no group.
    assert [g.members for g in plan.groups] == [EXPECTED_MEMBERS[1]]
    assert plan.notes == (
        "`layers.0.0.conv2` (picked by 'last_spatial') is not shared: its weight is the same Parameter as "
        "`layers.0.1.conv2.weight` (tied by the model: already shared); nothing is shared in its place",
        "`layers.0.1.conv2` (picked by 'last_spatial') is not shared: its weight is the same Parameter as "
        "`layers.0.0.conv2.weight` (tied by the model: already shared); nothing is shared in its place",
    )
    shared = sharify.sharify(model, example_inputs=X)
    assert n_params(shared) == plan.params_after == plain - 8 * 8 * 9 - 2 * 16 * 16 * 9
    assert shared.layers[0][1].conv2.weight is shared.layers[0][0].conv2.weight, "the model's own tie is kept"


def test_a_conv_module_used_by_two_blocks_is_left_out_with_a_note_and_counted_once() -> None:
    model = CifarResNet(num_blocks=(4, 3))
    plain = n_params(model)
    model.layers[0][1].conv2 = model.layers[0][0].conv2
    plan = sharify.plan(model, example_inputs=X)
    assert plan.params_before == n_params(model) == plain - 8 * 8 * 9
    assert [g.members for g in plan.groups] == [
        ("layers.0.2.conv2", "layers.0.3.conv2"),
        tuple(f"layers.1.{b}.conv2" for b in range(3)),
    ]
    assert plan.notes == (
        "`layers.0.0.conv2` (picked by 'last_spatial') is not shared: it is called 2 times per forward (one module "
        "used by several blocks: already shared); nothing is shared in its place",
    )
    shared = sharify.sharify(model, example_inputs=X)
    assert n_params(shared) == plan.params_after == plain - 8 * 8 * 9 - 8 * 8 * 9 - 2 * 16 * 16 * 9
    assert shared.layers[0][1].conv2 is shared.layers[0][0].conv2


def test_a_module_registered_twice_but_called_once_is_an_alias_and_shared() -> None:
    model = CifarResNet()
    model.last_block = model.layers[1][2]  # an alias attribute, as feature-extraction code adds
    plan = sharify.plan(model, example_inputs=X)
    assert [g.members for g in plan.groups] == EXPECTED_MEMBERS and not plan.notes
    shared = sharify.sharify(model, example_inputs=X)
    assert n_params(shared) == plan.params_after == n_params(model) - EXPECTED_SAVED
    assert shared.last_block.conv2 is shared.layers[1][2].conv2 and sharify.is_shared_conv(shared.last_block.conv2)
    assert sharify.verify(shared) == []


# --- 4. bad input ----------------------------------------------------------------------------------------------

RANKS = {"shared_rank": 2, "unique_rank": 1}
METHODS = [{"method": "share", "init": init} for init in ("average", "first", "random", "scaled")] + [
    {"method": "basis", "init": init, **RANKS} for init in ("orthogonal", "svd")
]


@pytest.mark.parametrize("options", METHODS, ids=lambda o: f"{o['method']}-{o['init']}")
@pytest.mark.parametrize("training", [False, True])
def test_new_modules_take_the_mode_of_the_conv_they_replace(options: dict, training: bool) -> None:
    model = CifarResNet().train(training)
    model.layers[1][1].conv2.train(not training)  # one conv in the other mode
    shared = sharify.sharify(model, example_inputs=X, **options)
    odd = "layers.1.1.conv2"
    for path, module in shared.named_modules():
        expected = (not training) if path == odd or path.startswith(odd + ".") else training
        assert module.training == expected, f"{path} is in {'train' if module.training else 'eval'} mode"


def test_an_eval_model_with_a_basis_neither_uses_nor_updates_batch_statistics() -> None:
    shared = sharify.sharify(CifarResNet().eval(), example_inputs=X, method="basis", init="svd", **RANKS)
    before = copy.deepcopy(shared.state_dict())
    out = shared(X)
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in before.items()), "running statistics changed"
    assert torch.allclose(out[:1], shared(X[:1]), atol=1e-5), "the output depends on the batch"


@pytest.mark.parametrize("flag", ["inplace", "skip_first_block", "depthwise", "align"])
@pytest.mark.parametrize("value", ["no", 1, 0.0])
def test_every_boolean_option_is_type_checked(flag: str, value: object) -> None:
    model = CifarResNet()
    before = copy.deepcopy(model)
    with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got {re.escape(repr(value))}"):
        sharify.sharify(model, example_inputs=X, **{flag: value})
    assert state_equal(model, before) and not any(sharify.is_shared_conv(m) for m in model.modules())
    if flag == "inplace":
        plan = sharify.plan(model, example_inputs=X)
        with pytest.raises(TypeError, match=r"^inplace must be True or False"):
            sharify.apply_plan(model, plan, inplace=value)  # type: ignore[arg-type]
        assert state_equal(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"positions": 1.5}, r"positions must be a selector or a list/tuple of selectors, got 1\.5 \(float\)"),
        ({"positions": {"last"}}, r"positions must be a selector or a list/tuple of selectors, got \{'last'\} \(set\)"),
        ({"positions": True}, r"positions must be a selector .*got True \(bool\)"),
        ({"positions": ["last", None]}, r"a position selector is a str .* or an int index, got None \(NoneType\)"),
        ({"method": 1}, r"method must be a str, got 1 \(int\)"),
        ({"init": ["average"]}, r"init must be a str, got \['average'\] \(list\)"),
        ({"preset": 5}, r"preset must be a str, got 5 \(int\)"),
        ({"method": "basis", "shared_rank": (8, 1), "unique_rank": 1}, r"shared_rank must be an int or a mapping"),
        ({"method": "basis", "shared_rank": 8, "unique_rank": 1.0}, r"unique_rank must be an int or a mapping"),
        (
            {"method": "basis", "shared_rank": {"layers.0": 2.5}, "unique_rank": 1},
            r"shared_rank must be a positive int",
        ),
        ({"method": "basis", "shared_rank": {0: 2}, "unique_rank": 1}, r"the keys of shared_rank must be stage paths"),
    ],
)
def test_options_of_the_wrong_type_are_type_errors_naming_the_option(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        sharify.plan(CifarResNet(), example_inputs=X, **kwargs)
    with pytest.raises(TypeError, match=match):
        sharify.sharify(CifarResNet(), example_inputs=X, **kwargs)


def test_sharing_options_are_checked_on_construction() -> None:
    assert sharify.SharingOptions(positions="last").positions == ("last",)
    assert sharify.SharingOptions(positions=0).positions == (0,)
    with pytest.raises(TypeError, match=r"skip_first_block must be True or False, got 'yes'"):
        sharify.SharingOptions(skip_first_block="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown position selector 'middle'"):
        sharify.SharingOptions(positions=("middle",))
    with pytest.raises(ValueError, match=r"method='basis' needs shared_rank="):
        sharify.SharingOptions(method="basis", init="svd")
    with pytest.raises(ValueError, match=r"unknown preset 'resnet'"):
        sharify.SharingOptions(preset="resnet")


def test_leaf_modules_takes_a_bare_path_and_refuses_unknown_paths_and_other_types() -> None:
    model = CifarResNet()
    one = sharify.plan(model, example_inputs=X, leaf_modules="layers.1")
    assert one.leaf_modules == ("layers.1",)
    assert one.to_dict() == sharify.plan(model, example_inputs=X, leaf_modules=["layers.1"]).to_dict()
    assert [g.stage for g in one.groups] == ["layers.0"]
    model.stage2 = model.layers[1]  # an alias path names the module under the path torch.fx traces
    assert sharify.plan(model, example_inputs=X, leaf_modules="stage2").leaf_modules == ("layers.1",)
    with pytest.raises(ValueError, match=r"leaf_modules names 'layer1', which is no submodule of CifarResNet; did you "
                       r"mean 'layers\.1'"):  # fmt: skip
        sharify.sharify(model, example_inputs=X, leaf_modules="layer1")
    with pytest.raises(ValueError, match=r"names 'nothing_like_it', .*; see model\.named_modules\(\)"):
        sharify.plan(model, example_inputs=X, leaf_modules=["nothing_like_it"])
    with pytest.raises(ValueError, match=r"names '', which is the root"):
        sharify.plan(model, example_inputs=X, leaf_modules=[""])
    with pytest.raises(TypeError, match=r"got a Sequential instance; pass its path or its class \(Sequential\)"):
        sharify.plan(model, example_inputs=X, leaf_modules=[model.layers[0]])
    with pytest.raises(TypeError, match=r"nn\.Module classes or module paths \(str\), got <class 'int'> \(type\)"):
        sharify.plan(model, example_inputs=X, leaf_modules=[int])
    with pytest.raises(TypeError, match=r"got 3 \(int\)"):
        sharify.plan(model, example_inputs=X, leaf_modules=[3])
    with pytest.raises(TypeError, match=r"leaf_modules must be a module path, a module class or a list of them"):
        sharify.plan(model, example_inputs=X, leaf_modules=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got a Sequential instance; pass its path"):
        sharify.plan(model, example_inputs=X, leaf_modules=model.layers[1])  # type: ignore[arg-type]
    assert sharify.plan(model, example_inputs=X, leaf_modules=(p for p in ["layers.1"])).leaf_modules == ("layers.1",)


def test_plan_refuses_what_sharify_refuses() -> None:
    shared = sharify.sharify(CifarResNet(), example_inputs=X)
    for call in (sharify.plan, sharify.sharify):
        with pytest.raises(sharify.AlreadySharifiedError, match=r"already sharified .*sharify\.unshare"):
            call(shared, example_inputs=X)
        with pytest.raises(sharify.UnsupportedModelError, match=r"DataParallel wrapper; sharify the bare model"):
            call(nn.DataParallel(CifarResNet()), example_inputs=X)
        with pytest.raises(TypeError, match=r"got the class CifarResNet; build the model first"):
            call(CifarResNet, example_inputs=X)  # type: ignore[arg-type]


def test_apply_plan_refuses_what_is_no_plan() -> None:
    model = CifarResNet()
    with pytest.raises(TypeError, match=r"apply_plan expects a SharingPlan .*got dict"):
        sharify.apply_plan(model, sharify.plan(model, example_inputs=X).to_dict())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"init must be a str, got 1"):
        sharify.apply_plan(model, sharify.plan(model, example_inputs=X), init=1)  # type: ignore[arg-type]


def _frozen(paths: list[str], name: str = "weight") -> CifarResNet:
    model = CifarResNet()
    for path in paths:
        getattr(model.get_submodule(path), name).requires_grad_(False)
    return model


def test_freezing_all_members_freezes_the_shared_tensor() -> None:
    model = _frozen([f"layers.0.{b}.conv2" for b in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared = sharify.sharify(model, example_inputs=X)
    holders = {k: h for k, (h, _) in sharify.shared_groups(shared).items()}
    assert not holders["layers.0.conv2"].weight.requires_grad
    assert holders["layers.1.conv2"].weight.requires_grad


def test_freezing_some_members_warns_naming_them() -> None:
    model = _frozen(["layers.0.0.conv2", "layers.0.2.conv2"])
    match = (
        r"`layers\.0\.0\.conv2`, `layers\.0\.2\.conv2` had a frozen weight \(requires_grad=False\), but other members "
        r"of group `layers\.0\.conv2` did not: the shared weight `sharify_shared\.layers\.0\.conv2\.weight` is "
        r"trainable"
    )
    with pytest.warns(UserWarning, match=match) as record:
        shared = sharify.sharify(model, example_inputs=X)
    assert record[0].filename == __file__, "the warning points at the caller"
    holder, _ = sharify.shared_groups(shared)["layers.0.conv2"]
    assert holder.weight.requires_grad
    with pytest.warns(UserWarning, match=match) as record:
        sharify.apply_plan(model, sharify.plan(model, example_inputs=X))
    assert record[0].filename == __file__


def test_frozen_members_of_a_basis_keep_their_own_tensors_frozen() -> None:
    model = _frozen([f"layers.1.{b}.conv2" for b in range(3)])
    shared = sharify.sharify(model, example_inputs=X, method="basis", **RANKS)
    for b in range(3):
        basis = shared.layers[1][b].conv2
        assert not any(p.requires_grad for p in basis.parameters())
    assert all(p.requires_grad for p in shared.layers[0][0].conv2.parameters())


def test_a_frozen_member_without_a_batchnorm_keeps_its_scaled_gain_frozen() -> None:
    model = CifarResNet()
    for block in model.layers[0]:
        block.bn2 = nn.Identity()  # no BatchNorm to absorb the gain: each member owns a shared_gain
    model.layers[0][0].conv2.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"`layers\.0\.0\.conv2` had a frozen weight"):
        shared = sharify.sharify(model, example_inputs=X, init="scaled")
    assert [shared.layers[0][b].conv2.shared_gain.requires_grad for b in range(3)] == [False, True, True]


def test_a_model_built_on_the_meta_device_is_sharified_on_meta_and_materialised() -> None:
    with torch.device("meta"):
        meta = CifarResNet()
    real = CifarResNet()
    shared_meta = sharify.sharify(meta, example_inputs=torch.empty(2, 3, 32, 32, device="meta"))
    shared_real = sharify.sharify(real, example_inputs=X)
    assert all(p.is_meta for p in shared_meta.parameters())
    shared_meta.to_empty(device="cpu").load_state_dict(shared_real.state_dict())
    assert torch.equal(shared_meta.eval()(X), shared_real.eval()(X))


def test_apply_plan_refuses_a_member_parametrized_after_the_plan_was_made() -> None:
    model = CifarResNet()
    plan = sharify.plan(model, example_inputs=X)
    with pytest.warns(FutureWarning):
        model.layers[1][2].conv2 = nn.utils.weight_norm(model.layers[1][2].conv2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sharify.SharifyError, match=r"`layers\.1\.2\.conv2` cannot be a member: the weight is computed"):
        sharify.apply_plan(model, plan, inplace=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(sharify.is_shared_conv(m) for m in model.modules())


def test_a_shape_passed_as_example_inputs_is_refused_with_the_tensor_to_pass() -> None:
    with pytest.raises(TypeError, match=r"example_inputs is a shape \(1, 3, 32, 32\), not a tensor; pass torch\.randn"):
        sharify.plan(CifarResNet(), example_inputs=(1, 3, 32, 32))  # type: ignore[arg-type]
