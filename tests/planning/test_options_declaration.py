"""`SharingOptions` is the one declaration of the sharing options: the command line's flags, the docstring,
the keyword form of `sharify()`/`plan()` and the recipe's dict all follow from its fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
import torch

import sharify
from sharify.cli import build_parser, sharing_kwargs
from sharify.planning import options as opts
from sharify.planning.options import SharingOptions
from tests.conftest import state_equal
from tests.foreign_nets import CifarResNet

X = torch.randn(1, 3, 32, 32)
FIELDS = dataclasses.fields(SharingOptions)
RANKS = {"shared_rank": 2, "unique_rank": 1}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", ["report", "finetune"])
def test_every_option_is_a_flag_whose_help_is_the_fields_metadata(command: str) -> None:
    flags = _flags(_subparser(command))
    for f in FIELDS:
        action = flags[opts.option_flag(f.name)]
        assert action.dest == f.name and action.default is None  # unset: the preset's value or the default
        assert action.help and action.help == f.metadata["help"]
        for key, value in f.metadata["cli"].items():
            if key != "action":
                assert getattr(action, key) == value, (f.name, key)
    sharing = {
        a.dest for a in _subparser(command)._actions if a.container.title and a.container.title.startswith("sharing")
    }
    assert sharing == {f.name for f in FIELDS} | {"input_size", "leaf_modules"}


def test_flags_keep_their_names_and_forms() -> None:
    flags = _flags(_subparser("report"))
    expected = ["--preset", "--positions", "--skip-first-block", "--depthwise", "--method", "--shared-rank"]
    assert all(flag in flags for flag in [*expected, "--unique-rank", "--init", "--align"])
    assert flags["--preset"].choices == sorted(sharify.PRESETS)
    assert flags["--method"].choices == ["share", "basis"] and flags["--init"].choices is None
    assert isinstance(flags["--skip-first-block"], argparse._StoreTrueAction)
    args = _subparser("report").parse_args(["m", "--positions", "first", "2", "--shared-rank", "4", "--align"])
    kwargs = sharing_kwargs(args)
    assert kwargs["positions"] == ("first", 2) and kwargs["shared_rank"] == 4 and kwargs["align"] is True
    assert kwargs["preset"] is None and kwargs["skip_first_block"] is None and kwargs["init"] is None


def test_the_docstring_documents_every_field_from_its_metadata() -> None:
    doc = " ".join((SharingOptions.__doc__ or "").split())
    attributes = doc[doc.index("Attributes:") :]
    for f in FIELDS:
        assert f"{f.name}: {' '.join(f.metadata['doc'].split())}" in attributes
        assert f.metadata["help"] and f.metadata["doc"]


def test_literal_types_are_the_valid_values() -> None:
    hints = typing.get_type_hints(SharingOptions)
    assert set(typing.get_args(hints["method"])) == set(opts.METHODS) == {"share", "basis"}
    assert set(typing.get_args(hints["init"])) == {"average", "first", "random", "scaled", "orthogonal", "svd"}
    assert set(typing.get_args(opts.NamedSelector)) == set(opts.SELECTORS)
    with pytest.raises(ValueError, match=r"unknown init 'mean' for method='share'; valid: 'average', 'first'"):
        SharingOptions(init="mean")  # type: ignore[arg-type]


def test_unset_fields_take_the_preset_then_the_default() -> None:
    assert SharingOptions() == SharingOptions(**{f.name: f.metadata["default"] for f in FIELDS if f.name != "init"})
    options = SharingOptions(preset="dsfb-basis", **RANKS)
    assert (options.skip_first_block, options.positions, options.method, options.init) == (
        True,
        ("all_spatial",),
        "basis",
        "orthogonal",
    )
    assert SharingOptions(method="basis", **RANKS).init == "orthogonal"  # the method's default init
    assert SharingOptions(preset="dsfb-basis", method="share").init == "average"


@pytest.mark.parametrize("call", [sharify.sharify, sharify.plan])
def test_an_unknown_keyword_is_a_type_error_with_the_closest_name(call) -> None:
    name = call.__name__
    expected = (
        rf"^{name}\(\) got an unexpected keyword argument 'positon' \(did you mean 'positions'\?\); the sharing "
        r"options \(fields of sharify\.SharingOptions\) are positions, group_size, skip_first_block, depthwise, "
        r"method, shared_rank, unique_rank, init, align, delta_rank, param_budget, preset; "
    )
    with pytest.raises(TypeError, match=expected):
        call(CifarResNet(), example_inputs=X, positon="first")
    with pytest.raises(TypeError, match=r"'example_input' \(did you mean 'example_inputs'\?\)"):
        call(CifarResNet(), example_input=X)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'; the sharing options"):
        call(CifarResNet(), example_inputs=X, zzz=1)
    with pytest.raises(TypeError, match=r"SharingOptions\.from_dict\(\) got an unexpected keyword argument 'inti' "):
        SharingOptions.from_dict({"inti": "first"})


def test_inplace_is_suggested_for_sharify_only() -> None:
    with pytest.raises(TypeError, match=r"'inplce' \(did you mean 'inplace'\?\)"):
        sharify.sharify(CifarResNet(), example_inputs=X, inplce=True)
    with pytest.raises(TypeError, match=r"'inplce'; the sharing options"):
        sharify.plan(CifarResNet(), example_inputs=X, inplce=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"positions": ("first",), "init": "scaled"},
        {"preset": "sharesnet-wrn"},
        {"preset": "dsfb-basis", **RANKS},
        {"method": "basis", "init": "svd", **RANKS},
        {"positions": "all_spatial", "skip_first_block": True, "align": True},
    ],
)
def test_options_object_and_keywords_are_the_same_call(kwargs: dict) -> None:
    options = SharingOptions(**kwargs)
    by_keywords = sharify.plan(CifarResNet(), example_inputs=X, **kwargs)
    by_object = sharify.plan(CifarResNet(), options, example_inputs=X)
    assert by_object.to_dict() == by_keywords.to_dict() and by_object.groups
    model = CifarResNet()
    torch.manual_seed(0)
    a = sharify.sharify(model, example_inputs=X, **kwargs)
    torch.manual_seed(0)
    b = sharify.sharify(model, options=options, example_inputs=X)
    assert {k: m for k, (_, m) in sharify.shared_groups(a).items()} == {
        k: m for k, (_, m) in sharify.shared_groups(b).items()
    }
    assert state_equal(a, b)
    assert a.sharify_shared.options == b.sharify_shared.options == options.to_dict()
    assert SharingOptions.from_dict(options.to_dict()) == options


def test_keywords_override_an_options_object() -> None:
    base = SharingOptions(preset="dsfb-basis", **RANKS)
    assert (
        sharify.plan(CifarResNet(), base, example_inputs=X, method="share").options
        == SharingOptions(preset="dsfb-basis", method="share").to_dict()
    )  # a new method drops the old method's init and ranks
    first = sharify.plan(CifarResNet(), SharingOptions(positions=("first",)), example_inputs=X, init="scaled")
    assert first.options["positions"] == ["first"] and first.options["init"] == "scaled"
    assert sharify.plan(CifarResNet(), base, example_inputs=X, init=None).options == base.to_dict()  # None: unset


def test_options_are_refused_with_a_preset_or_as_another_type() -> None:
    with pytest.raises(TypeError, match=r"both options and preset='dsfb-shared'; put the preset in the options"):
        sharify.sharify(CifarResNet(), SharingOptions(), preset="dsfb-shared")
    with pytest.raises(TypeError, match=r"got dict; pass SharingOptions\.from_dict\(options\)"):
        sharify.sharify(CifarResNet(), {"init": "first"})  # type: ignore[arg-type]
    plan = sharify.plan(CifarResNet(), example_inputs=X)
    with pytest.raises(TypeError, match=r"got SharingPlan; to apply a plan, call sharify\.apply_plan"):
        sharify.sharify(CifarResNet(), plan)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"from_dict expects a mapping of option -> value, got 3 \(int\)"):
        SharingOptions.from_dict(3)  # type: ignore[arg-type]


def test_a_recipe_stores_the_options_dict(tmp_path) -> None:
    shared = sharify.sharify(CifarResNet(), example_inputs=X, preset="sharesnet-wrn", init="first")
    recipe = sharify.read_recipe(sharify.save(shared, tmp_path / "m.safetensors"))
    assert recipe.options is not None
    assert SharingOptions.from_dict(recipe.options) == SharingOptions(preset="sharesnet-wrn", init="first")
    assert SharingOptions.from_dict({"preset": "dsfb-shared"}).skip_first_block is True  # missing keys: the preset's
