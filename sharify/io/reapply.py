"""Fitting a stored recipe to a model and re-applying it: the checks and the rewrite behind :func:`sharify.load`.

Every path and shape the recipe and the file's tensors need is compared with the unshared model
before anything is built (:func:`fit_problems`, :func:`check_fits`); :func:`apply_recipe` then runs
:func:`sharify.sharify` with the recorded options, example inputs and leaf modules and keeps the
result if its groups are the stored ones; otherwise (e.g. a file written before the analysis inputs
were recorded) it applies the stored whole-conv groups directly. Mismatches raise
:class:`~sharify.errors.RecipeMismatchError` naming the first path that differs.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping

from torch import nn

from ..errors import RecipeMismatchError, SharifyError
from ..planning.plan import ConvSignature, SharingGroup, SharingPlan, count_params
from ..planning.rules import delta_rank_of
from ..rewrite.apply import apply_plan, sharify
from .recipe import GroupRecipe, Recipe, analysis_kwargs, groups_of, store_prefix

__all__ = [
    "apply_recipe",
    "check_fits",
    "check_same_groups",
    "conv_path",
    "fit_problems",
    "raise_mismatch",
    "shape_mismatches",
]

logger = logging.getLogger(__name__)


def _key(group: GroupRecipe) -> tuple[str, tuple[str, ...], str, str]:
    return group.key, group.members, group.holder, group.method


def shape_mismatches(
    model_shapes: Mapping[str, tuple[int, ...]],
    file_shapes: Mapping[str, tuple[int, ...]],
    strict: bool,
    here: str = "the model",
    there: str = "the file",
) -> list[str]:
    """State_dict keys that only one side has (with ``strict``) or whose shapes differ, in words."""
    out = []
    for key, shape in model_shapes.items():
        if key not in file_shapes:
            if strict:
                out.append(f"`{key}` is in {here} but not in {there}")
        elif tuple(file_shapes[key]) != tuple(shape):
            out.append(f"`{key}` has shape {tuple(shape)} in {here} but {tuple(file_shapes[key])} in {there}")
    if strict:
        out += [f"`{key}` is in {there} but not in {here}" for key in file_shapes if key not in model_shapes]
    return out


def raise_mismatch(name: str, problems: list[str], recipe: Recipe) -> None:
    if not problems:
        return
    more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
    if recipe.source is not None:
        hint = (
            f"The file was saved from {recipe.source.library}:{recipe.source.name} {recipe.source.kwargs}; "
            "sharify.load(path) rebuilds it"
        )
    else:
        hint = f"The file was saved from a {recipe.model_class or 'model'}; load it into that architecture"
    raise RecipeMismatchError(f"{name} does not fit the model: {problems[0]}{more}. {hint}")


def fit_problems(
    model: nn.Module,
    recipe: Recipe,
    file_shapes: Mapping[str, tuple[int, ...]],
    *,
    strict: bool = True,
    here: str = "the model",
    there: str = "the file",
) -> list[str]:
    """What stops the recipe and the file's tensors from fitting the unshared ``model`` (empty: fits).

    Every member of a group must be a conv of the file's shapes: for whole-conv sharing the shared
    weight's shape, for a filter basis (``method="basis"``, members ``<conv>.shared``) the basis filter
    shape and the coefficients' output channels. Every other tensor is compared too. Problems come in
    this order: missing members, whole-conv members of another shape, other tensors, basis members of
    another geometry. Tensors the rewrite adds to members (``init="scaled"`` gains, a basis block's
    unique basis, BatchNorm and coefficients) are checked after re-applying the recipe.
    """
    if not all(g.whole_conv or g.method == "basis" for g in recipe.groups):
        return []  # a rewrite this version does not know: checked against the file after re-applying it
    modules = dict(model.named_modules())
    problems: list[str] = [  # missing members first, then whole-conv members of other shapes
        f"`{store}` (sharified on its own in the file) is not in {here}"
        for store in recipe.stores
        if store not in modules
    ]
    basis_problems: list[str] = []  # basis members whose geometry differs: after the other tensors
    member_keys: set[str] = set()
    prefixes: list[str] = []
    for group in recipe.groups:
        for member in group.members:
            path = conv_path(group, member)
            conv = modules.get(path)
            member_keys.update((f"{path}.weight", f"{path}.bias"))
            prefixes.append(f"{path}.")
            if conv is None:
                problems.append(f"`{path}` (member of shared group `{group.key}`) is not in {here}")
            elif not isinstance(conv, (nn.Conv2d, nn.Linear)):
                kind = type(conv).__name__
                problems.append(f"`{path}` (member of shared group `{group.key}`) is a {kind}, not a conv or Linear")
            elif group.whole_conv:
                for attr in ("weight", "bias"):
                    mine = getattr(conv, attr)
                    have = None if mine is None else tuple(mine.shape)
                    theirs = file_shapes.get(f"{group.holder_prefix}{attr}")
                    if have != (None if theirs is None else tuple(theirs)):
                        problems.append(
                            f"`{path}.{attr}` is {have or 'absent'} in {here} but the shared "
                            f"`{group.holder_prefix}{attr}` is {theirs or 'absent'} in {there}"
                        )
            else:
                basis_problems += _basis_problems(group, path, conv, file_shapes, here, there)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in member_keys}
    stores = tuple(store_prefix(s) for s in {"", *recipe.stores, *(g.store for g in recipe.groups)})
    rest = {k: v for k, v in file_shapes.items() if not k.startswith((*stores, *prefixes))}
    return problems + shape_mismatches(model_shapes, rest, strict, here, there) + basis_problems


def conv_path(group: GroupRecipe, member: str) -> str:
    """The original conv a member stands for: itself, or the conv a filter-basis block replaces."""
    if group.method == "basis" and member.endswith(".shared"):
        return member.removesuffix(".shared")
    return member


def _basis_problems(
    group: GroupRecipe,
    path: str,
    conv: nn.Conv2d | nn.Linear,
    file_shapes: Mapping[str, tuple[int, ...]],
    here: str,
    there: str,
) -> list[str]:
    """How the conv at ``path`` differs from the filter-basis block the file has in its place."""
    basis_key = f"{group.holder_prefix}weight"
    basis = file_shapes.get(basis_key)
    have = tuple(conv.weight.shape)
    if basis is None or tuple(basis[1:]) != have[1:]:
        return [
            f"`{path}.weight` is {have} in {here} but its filters do not fit the shared basis `{basis_key}`, "
            f"which is {basis or 'absent'} in {there}"
        ]
    coeff = file_shapes.get(f"{path}.coeff.weight")
    if coeff is None or coeff[0] != have[0]:
        return [
            f"`{path}` has {have[0]} output channels in {here} but its 1x1 coefficients `{path}.coeff.weight` "
            f"are {coeff or 'absent'} in {there}"
        ]
    return []


def check_fits(
    model: nn.Module, recipe: Recipe, file_shapes: Mapping[str, tuple[int, ...]], *, name: str, strict: bool = True
) -> None:
    """Checks that an unshared ``model`` has every path and shape the recipe and file need.

    Raises:
        RecipeMismatchError: Naming the first path that does not match.
    """
    raise_mismatch(name, fit_problems(model, recipe, file_shapes, strict=strict), recipe)


def _plan_from_recipe(model: nn.Module, recipe: Recipe) -> SharingPlan:
    groups = []
    rank = (recipe.options or {}).get("delta_rank") or 0
    for g in recipe.groups:
        conv = model.get_submodule(g.members[0])
        assert isinstance(conv, (nn.Conv2d, nn.Linear))  # check_fits ran first
        sig = ConvSignature.of(conv)
        row = conv.weight.numel() // sig.out_channels
        groups.append(
            SharingGroup(
                key=g.key,
                stage=g.stage,
                position=g.position,
                signature=sig,
                members=g.members,
                weight_numel=conv.weight.numel(),
                bias_numel=0 if conv.bias is None else conv.bias.numel(),
                delta_rank=delta_rank_of(rank, g.stage, g.key, sig.out_channels, row),
            )
        )
    options = {k: v for k, v in (recipe.options or {}).items() if k != "init"}
    return SharingPlan(type(model).__name__, (), tuple(groups), count_params(model), options)


def apply_recipe(model: nn.Module, recipe: Recipe, *, name: str) -> nn.Module:
    """A copy of the unshared ``model`` sharified exactly as the recipe says (``model`` is not modified).

    Runs :func:`sharify.sharify` with the recorded options, example inputs and leaf modules and keeps
    the result if it has the recorded groups. Otherwise, when every group shares whole convs, the
    recorded groups are applied directly (e.g. a file that does not record the analysis inputs).

    A recipe with submodules sharified on their own (:attr:`~sharify.io.recipe.Recipe.stores`) is applied
    store by store: the root's own groups first, then each such submodule, with its own options and
    analysis, in the copy.

    Raises:
        RecipeMismatchError: The groups cannot be made on this model.
    """
    if recipe.stores:
        target = apply_recipe(model, recipe.scoped(""), name=name)
        for store in sorted(recipe.stores):
            sub = apply_recipe(target.get_submodule(store), recipe.scoped(store), name=f"{name} (at `{store}`)")
            target.set_submodule(store, sub)
        got, wanted = [_key(g) for g in groups_of(target)], [_key(g) for g in recipe.groups]
        if sorted(got) != sorted(wanted):
            diff = _first_difference(got, wanted)
            raise_mismatch(name, [f"re-applying the recipe gave other groups than the file's ({diff})"], recipe)
        return target
    if recipe.options is None:
        return copy.deepcopy(model)
    options = dict(recipe.options)
    wanted = [_key(g) for g in recipe.groups]
    # The recorded groups alone rebuild the model, unless the rewrite needs the model's graph: filter bases,
    # and init="scaled" (which folds gains into the BatchNorm after a member, found by the analysis).
    direct = all(g.whole_conv for g in recipe.groups) and options.get("init") != "scaled"
    try:
        with warnings.catch_warnings():  # the analysis' remarks were the saver's to see; the groups are checked here
            warnings.simplefilter("ignore")
            shared = sharify(model, **options, **analysis_kwargs(recipe))
        got = [_key(g) for g in groups_of(shared)]
        if got == wanted:
            return shared
        reason = f"it makes other groups ({_first_difference(got, wanted)})"
    except (SharifyError, TypeError, ValueError) as exc:  # e.g. untraceable without the original leaf_modules
        reason = f"it fails ({exc})"
    if not direct:
        raise_mismatch(name, [f"sharify(model, **{options}) does not rebuild the file's groups: {reason}"], recipe)
    logger.info("sharify(model, **%s): %s; applying the groups recorded in %s", options, reason, name)
    try:
        shared = apply_plan(model, _plan_from_recipe(model, recipe), init=options.get("init", "average"))
    except (SharifyError, ValueError) as exc:
        raise_mismatch(name, [str(exc)], recipe)
    got = [_key(g) for g in groups_of(shared)]
    if got != wanted:
        raise_mismatch(
            name,
            [f"re-applying the recipe gave other groups than the file's ({_first_difference(got, wanted)})"],
            recipe,
        )
    return shared


def _first_difference(
    got: list[tuple[str, tuple[str, ...], str, str]], wanted: list[tuple[str, tuple[str, ...], str, str]]
) -> str:
    """The first group (in the file's order) that re-applying the recipe made differently, in words."""
    mine, theirs = {g[0]: g for g in got}, {w[0]: w for w in wanted}
    for key in [*theirs, *mine]:
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        if a is None:
            return f"first: the file's group `{key}` is not made"
        if b is None:
            return f"first: group `{key}`, which the file does not have"
        member = next((m for m in (*b[1], *a[1]) if (m in b[1]) != (m in a[1])), None)
        at = f", at `{member}`" if member else ""
        return f"first: group `{key}` has other members than in the file{at}"
    return "in their order"


def check_same_groups(model: nn.Module, recipe: Recipe, *, name: str) -> None:
    """Checks that an already sharified ``model`` has the recipe's groups."""
    mine = {g.key: g for g in groups_of(model)}
    problems = []
    for g in recipe.groups:
        have = mine.pop(g.key, None)
        if have is None:
            problems.append(f"shared group `{g.key}` (members {', '.join(g.members)}) is not in the model")
        elif _key(have) != _key(g):
            diff = next((m for m in g.members if m not in have.members), None) or next(
                (m for m in have.members if m not in g.members), g.key
            )
            problems.append(f"shared group `{g.key}` has other members in the model than in the file (at `{diff}`)")
    problems += [f"the model shares `{k}`, which the file does not" for k in mine]
    raise_mismatch(name, problems, recipe)
