"""The recipe of a sharified model: what :func:`sharify.save` stores next to the weights, and its JSON form.

A sharified state_dict only loads into an identically sharified model, so :func:`sharify.save` stores
*how* the model was made next to the weights (as model-surgery tools do: ModelOpt's
``mto.save/restore``, NNCF's config + state_dict, FX quantization's "re-run prepare, then load"):

* the source model when known (timm name + ``num_classes``/``in_chans``, a torchvision builder
  name, or whatever :func:`sharify.zoo.build_model` was called with; see :mod:`sharify.source`);
* the options the model was sharified with (``model.sharify_shared.options``);
* what the analysis ran with: the example input shapes (and dtypes) and the ``leaf_modules`` paths;
* the groups: holder key -> member conv paths, with each holder's stage and position.

Fitting a recipe to a model and re-applying it is :mod:`sharify.reapply`; the names that lived here
before (``apply_recipe``, ``check_fits``, ``detect_source``, ...) are still importable from this module.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import SHARED_STORE_NAME, SharedStore, shared_groups
from .zoo import ModelSource

__all__ = [
    "RECIPE_FORMAT",
    "GroupRecipe",
    "Recipe",
    "analysis_kwargs",
    "groups_of",
    "recipe_of",
]

#: Names that moved to :mod:`sharify.reapply` and :mod:`sharify.source`, importable from here as before.
_MOVED = {
    "apply_recipe": "reapply",
    "check_fits": "reapply",
    "check_same_groups": "reapply",
    "fit_problems": "reapply",
    "raise_mismatch": "reapply",
    "shape_mismatches": "reapply",
    "detect_source": "source",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:  # imported on use: those modules import this one
        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Version of the recipe's JSON layout; files with a newer one are refused.
RECIPE_FORMAT = 1


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
            TypeError: ``text`` is not a string.
            ValueError: Not a recipe (or not JSON), or a newer recipe format.
        """
        if not isinstance(text, (str, bytes)):
            raise TypeError(f"Recipe.from_json expects the recipe's JSON text, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the recipe entry is not JSON ({exc})") from exc
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
