"""The recipe of a sharified model: what :func:`sharify.save` stores next to the weights, and its JSON form.

A sharified state_dict only loads into an identically sharified model, so :func:`sharify.save` stores
*how* the model was made next to the weights (as model-surgery tools do: ModelOpt's
``mto.save/restore``, NNCF's config + state_dict, FX quantization's "re-run prepare, then load"):

* the source model when known (timm name + ``num_classes``/``in_chans``, a torchvision builder
  name, or whatever :func:`sharify.io.zoo.build_model` was called with; see :mod:`sharify.io.source`);
* the options the model was sharified with (``model.sharify_shared.options``);
* what the analysis ran with: the example input shapes (and dtypes) and the ``leaf_modules`` paths;
* the groups: holder key -> member conv paths, with each holder's stage and position;
* submodules sharified on their own (``sharify(det.backbone.body, inplace=True)``): where each store
  lives and its own options and analysis (``stores``); such a group's key is prefixed by that path;
* state_dict entries the model itself ties (one conv module used twice, ``b.weight = a.weight``):
  stored once, the other keys listed as ``aliases`` of it.

A recipe with neither stores nor aliases is written in format 1, as before they existed, so older
sharify versions still read it; format 2 adds them.

Fitting a recipe to a model and re-applying it is :mod:`sharify.io.reapply`; finding a model's source is
:mod:`sharify.io.source`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..layers import SHARED_STORE_NAME, SharedStore, scoped_key, shared_groups, shared_stores
from .zoo import ModelSource

__all__ = [
    "RECIPE_FORMAT",
    "GroupRecipe",
    "Recipe",
    "analysis_kwargs",
    "groups_of",
    "recipe_of",
    "store_prefix",
]

#: Version of the recipe's JSON layout; files with a newer one are refused. Format 2 adds ``stores``,
#: ``aliases`` and the groups' ``store``; a recipe without them is written as format 1.
RECIPE_FORMAT = 2


@dataclass(frozen=True)
class GroupRecipe:
    """One sharing group of a recipe: the holder key and the member conv paths (execution order).

    ``store`` is the path of the submodule whose store holds the group (``""``: the model's own);
    ``key`` is then prefixed by it, as in :func:`sharify.shared_groups`, and ``members`` are paths in
    the whole model.
    """

    key: str
    members: tuple[str, ...]
    stage: str = ""
    position: str = ""
    holder: str = "SharedConvParams"
    method: str = "share"
    store: str = ""

    @property
    def local_key(self) -> str:
        """The key inside its store (``key`` without the store's path)."""
        return self.key[len(self.store) + 1 :] if self.store else self.key

    @property
    def holder_prefix(self) -> str:
        """The state_dict prefix of the group's tensors, e.g. ``backbone.body.sharify_shared.layer1.conv2.``."""
        return f"{store_prefix(self.store)}{self.local_key}."

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
        stores: Submodules sharified on their own, by path: ``{"options": ..., "analysis": ...}`` of
            each (``options`` and ``analysis`` above are the root's own store's).
        aliases: State_dict keys the model ties to another entry (not stored in the file), each mapped
            to the key that is stored.
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
    stores: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The recipe as stored in the file (``metadata`` is stored as separate entries)."""
        data = asdict(self)
        data.pop("metadata")
        data["source"] = None if self.source is None else asdict(self.source)
        for g in data["groups"]:
            if not g["store"]:
                del g["store"]
        for name in ("stores", "aliases"):
            if not data[name]:
                del data[name]
        return json.dumps(data, sort_keys=True)

    def scoped(self, store: str) -> Recipe:
        """The part of this recipe for the store at ``store``, with paths relative to that submodule."""
        if not store:
            options, analysis = self.options, self.analysis
        else:
            options, analysis = self.stores[store]["options"], self.stores[store]["analysis"]
        cut = len(store) + 1 if store else 0
        groups = tuple(
            replace(g, key=g.local_key, members=tuple(m[cut:] for m in g.members), store="")
            for g in self.groups
            if g.store == store
        )
        return replace(self, options=options, analysis=analysis, groups=groups, stores={}, aliases={})

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
        recipe = cls(
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
            stores=_checked_stores(data.get("stores") or {}),
            aliases=_checked_aliases(data.get("aliases") or {}),
        )
        for g in recipe.groups:
            if g.store and (g.store not in recipe.stores or not g.key.startswith(g.store + ".")):
                raise ValueError(f"group `{g.key}` does not fit its store `{g.store}` (not in `stores`/not under it)")
        return recipe


def _checked_stores(stores: Any) -> dict[str, dict[str, Any]]:
    """The recipe's ``stores`` entry, checked (a damaged one is a ``ValueError``)."""
    if not isinstance(stores, dict) or not all(
        isinstance(k, str) and k and isinstance(v, dict) and isinstance(v.get("options"), dict)
        for k, v in stores.items()
    ):
        raise ValueError(f"the recipe's stores entry is malformed: {stores!r}")
    return {
        k: {"options": v["options"], "analysis": _checked_analysis(v.get("analysis") or {})} for k, v in stores.items()
    }


def _checked_aliases(aliases: Any) -> dict[str, str]:
    """The recipe's ``aliases`` entry, checked (a damaged one is a ``ValueError``)."""
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"the recipe's aliases entry is malformed: {aliases!r}")
    return dict(aliases)


def store_prefix(store: str) -> str:
    """The state_dict prefix of the store registered on the submodule at ``store`` (``""``: the root)."""
    return f"{store}.{SHARED_STORE_NAME}." if store else f"{SHARED_STORE_NAME}."


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
    """The sharing groups of a sharified model as recipe entries (those of every store, at any depth)."""
    groups = shared_groups(model)
    out = []
    for scope, store in shared_stores(model).items():
        for local, holder in store.holders().items():
            key = scoped_key(scope, local)
            out.append(
                GroupRecipe(
                    key=key,
                    members=tuple(groups[key][1]),
                    stage=holder.stage,
                    position=holder.position,
                    holder=type(holder).__name__,
                    method=getattr(holder, "method", "share"),  # "basis": the members are a BasisConv2d's shared convs
                    store=scope,
                )
            )
    return tuple(out)


def _store_entry(store: SharedStore) -> dict[str, Any]:
    return {"options": dict(store.options), "analysis": dict(store.analysis or {})}


def recipe_of(model: nn.Module, *, source: ModelSource | None, aliases: Mapping[str, str] | None = None) -> Recipe:
    """The recipe of a (bare, unwrapped) model; ``checksums`` and ``metadata`` are left empty.

    Args:
        model: The model.
        source: Where to rebuild it from.
        aliases: State_dict keys the model ties to another key (see :attr:`Recipe.aliases`).
    """

    stores = shared_stores(model)
    root = stores.pop("", None)
    nested = {path: _store_entry(s) for path, s in stores.items() if s.holders()}
    cls = type(model)
    return Recipe(
        version=__version__,
        model_class=f"{cls.__module__}.{cls.__qualname__}",
        source=source,
        options=None if root is None else dict(root.options),
        groups=groups_of(model),
        torch_version=torch.__version__.split("+")[0],
        analysis={} if root is None else dict(root.analysis or {}),
        stores=nested,
        aliases=dict(aliases or {}),
        format=RECIPE_FORMAT if nested or aliases else 1,
    )
