"""The recipe of a sharified model: how to rebuild it, stored next to its weights.

A sharified state_dict only loads into an identically sharified model, so :func:`sharify.save` stores
*how* the model was made next to the weights (as model-surgery tools do: ModelOpt's
``mto.save/restore``, NNCF's config + state_dict, FX quantization's "re-run prepare, then load"):

* the source model when known (timm name + ``num_classes``/``in_chans``, a torchvision builder
  name, or whatever :func:`sharify.zoo.build_model` was called with);
* the options the model was sharified with (``model.sharify_shared.options``);
* what the analysis ran with: the example input shapes (and dtypes) and the ``leaf_modules`` paths;
* the groups: holder key -> member conv paths, with each holder's stage and position.

Re-applying a recipe to an unshared model first runs :func:`sharify.sharify` with the stored options,
example inputs and leaf modules (so new methods and options work as long as the store records them)
and keeps the result if its groups are the stored ones; otherwise (e.g. a file written before the
analysis inputs were recorded) it applies the stored whole-conv groups directly. Either way the
groups are checked, and every path and shape is compared with the file before anything is built.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import RecipeMismatchError, SharifyError
from .layers import SHARED_STORE_NAME, SharedStore, shared_groups
from .plan import ConvSignature, SharingGroup, SharingPlan, count_params
from .rewrite import apply_plan, sharify
from .zoo import SOURCE_ATTR, ModelSource

__all__ = [
    "RECIPE_FORMAT",
    "GroupRecipe",
    "Recipe",
    "analysis_kwargs",
    "apply_recipe",
    "check_fits",
    "check_same_groups",
    "detect_source",
    "fit_problems",
    "groups_of",
    "raise_mismatch",
    "shape_mismatches",
    "recipe_of",
]

logger = logging.getLogger(__name__)

#: Version of the recipe's JSON layout; files with a newer one are refused.
RECIPE_FORMAT = 1

_HOLDER_PREFIX = SHARED_STORE_NAME + "."


@dataclass(frozen=True)
class GroupRecipe:
    """One sharing group of a recipe: the holder key and the member conv paths (execution order)."""

    key: str
    members: tuple[str, ...]
    stage: str = ""
    position: str = ""
    holder: str = "SharedConvParams"
    method: str = "share"

    @property
    def whole_conv(self) -> bool:
        """The members are the original convs, sharing their whole weight (``method="share"``)."""
        return self.method == "share" and self.holder == "SharedConvParams"


@dataclass(frozen=True)
class Recipe:
    """How a saved model was made; read it with :func:`sharify.read_recipe`.

    Attributes:
        version: sharify version that wrote the file.
        model_class: Qualified class name of the saved model.
        source: Where to rebuild the architecture from, or ``None`` when unknown.
        options: The options of :func:`sharify.sharify` (``None``: the model was not sharified).
        groups: The sharing groups.
        checksums: CRC-32 of every tensor's bytes, by state_dict key.
        metadata: The user's own string entries passed to :func:`sharify.save`.
        torch_version: torch version that wrote the file.
        format: Version of the recipe layout.
        analysis: What the analysis ran with: ``input_shapes``, ``input_dtypes``, ``leaf_modules``
            (empty for files written before they were recorded, and for unshared models).
    """

    version: str
    model_class: str
    source: ModelSource | None
    options: dict[str, Any] | None
    groups: tuple[GroupRecipe, ...]
    checksums: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    torch_version: str = ""
    format: int = RECIPE_FORMAT
    analysis: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The recipe as stored in the file (``metadata`` is stored as separate entries)."""
        data = asdict(self)
        data.pop("metadata")
        data["source"] = None if self.source is None else asdict(self.source)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, metadata: Mapping[str, str] | None = None) -> Recipe:
        """Parses :meth:`to_json`'s output.

        Raises:
            ValueError: Not a recipe, or a newer recipe format.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or "format" not in data or "groups" not in data:
            raise ValueError("the recipe entry is not a JSON object with 'format' and 'groups'")
        if not isinstance(data["format"], int) or data["format"] > RECIPE_FORMAT:
            raise ValueError(
                f"the recipe has format {data['format']!r}, newer than this sharify reads ({RECIPE_FORMAT}); "
                "upgrade sharify"
            )
        src = data.get("source")
        return cls(
            version=str(data.get("version", "")),
            model_class=str(data.get("model_class", "")),
            source=None if src is None else ModelSource(src["library"], src["name"], dict(src.get("kwargs", {}))),
            options=data.get("options"),
            groups=tuple(GroupRecipe(**{**g, "members": tuple(g["members"])}) for g in data["groups"]),
            checksums=dict(data.get("checksums", {})),
            metadata=dict(metadata or {}),
            torch_version=str(data.get("torch_version", "")),
            format=data["format"],
            analysis=_checked_analysis(data.get("analysis") or {}),
        )


def _checked_analysis(analysis: Any) -> dict[str, Any]:
    """The recipe's ``analysis`` entry, checked (a damaged one is a ``ValueError``)."""
    if not isinstance(analysis, dict):
        raise ValueError(f"the recipe's analysis entry is not a JSON object: {analysis!r}")
    shapes, dtypes = analysis.get("input_shapes", []), analysis.get("input_dtypes", [])
    leaves = analysis.get("leaf_modules", [])
    ok = (
        isinstance(shapes, list)
        and all(isinstance(x, list) and all(isinstance(d, int) and d >= 0 for d in x) for x in shapes)
        and isinstance(dtypes, list)
        and len(dtypes) in (0, len(shapes))
        and all(isinstance(getattr(torch, str(d), None), torch.dtype) for d in dtypes)
        and isinstance(leaves, list)
        and all(isinstance(x, str) for x in leaves)
    )
    if not ok:
        raise ValueError(f"the recipe's analysis entry is malformed: {analysis!r}")
    return {"input_shapes": shapes, "input_dtypes": dtypes, "leaf_modules": leaves}


def analysis_kwargs(recipe: Recipe) -> dict[str, Any]:
    """``example_inputs`` and ``leaf_modules`` for :func:`sharify.sharify` that repeat the recorded analysis."""
    kwargs: dict[str, Any] = {}
    shapes = recipe.analysis.get("input_shapes") or []
    if shapes:
        dtypes = recipe.analysis.get("input_dtypes") or ["float32"] * len(shapes)
        kwargs["example_inputs"] = tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(shapes, dtypes))
    if recipe.analysis.get("leaf_modules"):
        kwargs["leaf_modules"] = list(recipe.analysis["leaf_modules"])
    return kwargs


def detect_source(model: nn.Module) -> ModelSource | None:
    """The model's source: recorded by :func:`sharify.zoo.build_model`, or read from a timm model.

    For a timm model it is ``pretrained_cfg["architecture"]`` (with its pretrained tag, which selects
    the data config) and ``num_classes`` and ``in_chans`` (the first conv's input channels); other
    builder kwargs that do not change the state_dict (``global_pool``, drop rates) are not visible
    on the model: pass ``source=`` or build with :func:`sharify.zoo.build_model` to record them.
    A torchvision model does not know its builder's name: pass ``source=`` to :func:`sharify.save`
    or build it with :func:`sharify.zoo.build_model`.
    """
    recorded = getattr(model, SOURCE_ATTR, None)
    if isinstance(recorded, ModelSource):
        return recorded
    cfg = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(cfg, dict) and cfg.get("architecture"):
        kwargs: dict[str, Any] = {}
        if isinstance(getattr(model, "num_classes", None), int):
            kwargs["num_classes"] = model.num_classes
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None:
            kwargs["in_chans"] = first_conv.in_channels
        tag = cfg.get("tag")  # the pretrained tag selects the rebuilt model's pretrained_cfg (mean/std, input size)
        return ModelSource("timm", f"{cfg['architecture']}.{tag}" if tag else str(cfg["architecture"]), kwargs)
    return None


def groups_of(model: nn.Module) -> tuple[GroupRecipe, ...]:
    """The sharing groups of a sharified model as recipe entries."""
    return tuple(
        GroupRecipe(
            key=key,
            members=tuple(members),
            stage=holder.stage,
            position=holder.position,
            holder=type(holder).__name__,
            method=getattr(holder, "method", "share"),  # "basis": the members are a BasisConv2d's shared convs
        )
        for key, (holder, members) in shared_groups(model).items()
    )


def recipe_of(model: nn.Module, *, source: ModelSource | None) -> Recipe:
    """The recipe of a (bare, unwrapped) model; ``checksums`` and ``metadata`` are left empty."""
    from . import __version__

    store = model._modules.get(SHARED_STORE_NAME)
    options = dict(store.options) if isinstance(store, SharedStore) else None
    analysis = dict(getattr(store, "analysis", None) or {}) if isinstance(store, SharedStore) else {}
    cls = type(model)
    return Recipe(
        version=__version__,
        model_class=f"{cls.__module__}.{cls.__qualname__}",
        source=source,
        options=options,
        groups=groups_of(model),
        torch_version=torch.__version__.split("+")[0],
        analysis=analysis,
    )


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
    problems: list[str] = []  # missing members first, then whole-conv members of other shapes
    basis_problems: list[str] = []  # basis members whose geometry differs: after the other tensors
    member_keys: set[str] = set()
    prefixes: list[str] = []
    for group in recipe.groups:
        for member in group.members:
            path = _conv_path(group, member)
            conv = modules.get(path)
            member_keys.update((f"{path}.weight", f"{path}.bias"))
            prefixes.append(f"{path}.")
            if conv is None:
                problems.append(f"`{path}` (member of shared group `{group.key}`) is not in {here}")
            elif not isinstance(conv, nn.Conv2d):
                kind = type(conv).__name__
                problems.append(f"`{path}` (member of shared group `{group.key}`) is a {kind}, not a conv")
            elif group.whole_conv:
                for attr in ("weight", "bias"):
                    mine = getattr(conv, attr)
                    have = None if mine is None else tuple(mine.shape)
                    theirs = file_shapes.get(f"{_HOLDER_PREFIX}{group.key}.{attr}")
                    if have != (None if theirs is None else tuple(theirs)):
                        problems.append(
                            f"`{path}.{attr}` is {have or 'absent'} in {here} but the shared "
                            f"`{_HOLDER_PREFIX}{group.key}.{attr}` is {theirs or 'absent'} in {there}"
                        )
            else:
                basis_problems += _basis_problems(group, path, conv, file_shapes, here, there)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in member_keys}
    rest = {k: v for k, v in file_shapes.items() if not k.startswith((_HOLDER_PREFIX, *prefixes))}
    return problems + shape_mismatches(model_shapes, rest, strict, here, there) + basis_problems


def _conv_path(group: GroupRecipe, member: str) -> str:
    """The original conv a member stands for: itself, or the conv a filter-basis block replaces."""
    if group.method == "basis" and member.endswith(".shared"):
        return member.removesuffix(".shared")
    return member


def _basis_problems(
    group: GroupRecipe, path: str, conv: nn.Conv2d, file_shapes: Mapping[str, tuple[int, ...]], here: str, there: str
) -> list[str]:
    """How the conv at ``path`` differs from the filter-basis block the file has in its place."""
    basis_key = f"{_HOLDER_PREFIX}{group.key}.weight"
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
    for g in recipe.groups:
        conv = model.get_submodule(g.members[0])
        assert isinstance(conv, nn.Conv2d)  # check_fits ran first
        groups.append(
            SharingGroup(
                key=g.key,
                stage=g.stage,
                position=g.position,
                signature=ConvSignature.of(conv),
                members=g.members,
                weight_numel=conv.weight.numel(),
                bias_numel=0 if conv.bias is None else conv.bias.numel(),
            )
        )
    options = {k: v for k, v in (recipe.options or {}).items() if k != "init"}
    return SharingPlan(type(model).__name__, (), tuple(groups), count_params(model), options)


def apply_recipe(model: nn.Module, recipe: Recipe, *, name: str) -> nn.Module:
    """A copy of the unshared ``model`` sharified exactly as the recipe says (``model`` is not modified).

    Runs :func:`sharify.sharify` with the recorded options, example inputs and leaf modules and keeps
    the result if it has the recorded groups. Otherwise, when every group shares whole convs, the
    recorded groups are applied directly (e.g. a file that does not record the analysis inputs).

    Raises:
        RecipeMismatchError: The groups cannot be made on this model.
    """
    if recipe.options is None:
        return copy.deepcopy(model)
    options = dict(recipe.options)
    wanted = [_key(g) for g in recipe.groups]
    # The recorded groups alone rebuild the model, unless the rewrite needs the model's graph: filter bases,
    # and init="scaled" (which folds gains into the BatchNorm after a member, found by the analysis).
    direct = all(g.whole_conv for g in recipe.groups) and options.get("init") != "scaled"
    try:
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
