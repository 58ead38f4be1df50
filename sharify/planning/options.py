"""The sharing options, and the named presets of the published variants.

A preset is just a bundle of options; options passed explicitly override it. An explicit ``method``
other than the preset's also drops the preset's ``init`` (it belongs to the preset's method: the new
method's default applies unless ``init`` is given too)::

    sharify(model, preset="dsfb-shared++")               # ResNet50-Shared++ of Kang et al.
    sharify(model, preset="dsfb-basis", shared_rank=48, unique_rank=1)

==========================  ==================================================================
preset                      options
==========================  ==================================================================
``sharesnet`` (default)     last spatial conv of every block (Boulch: ImageNet ResNets, ResNet-164)
``sharesnet-wrn``           the same, each stage's first block left out (Boulch: Wide ResNets)
``dsfb-shared``             non-first blocks, last spatial conv (ResNet50/101-Shared)
``dsfb-shared++``           non-first blocks, last spatial and last conv (ResNet50-Shared++); on a
                            basic block the last conv *is* the last spatial one, so no extra group
                            (the paper defines Shared++ for the bottleneck's last 1x1)
``dsfb-basis``              non-first blocks, every spatial conv replaced by a shared filter basis
                            plus a unique one (ResNet34-S48U1: ``shared_rank=48, unique_rank=1``)
``mobilenetv2-shared``      non-first blocks, the 1x1 expansion conv (MobileNetV2-Shared)
``mobilenetv2-shared++``    non-first blocks, expansion and projection 1x1 (MobileNetV2-Shared++)
==========================  ==================================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .._paths import module_paths

__all__ = [
    "METHODS",
    "PRESETS",
    "SELECTORS",
    "Rank",
    "Selector",
    "SharingOptions",
    "check_flag",
    "resolve_leaf_modules",
    "resolve_options",
]

#: A position selector: ``"last_spatial"``, ``"all_spatial"``, ``"first"``, ``"last"`` or a conv index.
Selector = str | int
SELECTORS = ("last_spatial", "all_spatial", "first", "last")
_ALIASES: dict[str, int] = {"first": 0, "last": -1}  # selectors that are conv indices
#: ``"share"``: members share one conv weight (ShaResNet). ``"basis"``: members share a filter basis (DSFB).
METHODS = ("share", "basis")
#: A basis rank: an int counts filters per 64 channels (the paper's ``m = C/64`` scaling): a conv with ``C``
#: output channels gets ``max(1, floor(rank * C / 64 + 1/2))`` filters (rounded half up, at least one; see
#: :func:`sharify.planning.rules.scaled_rank`). A mapping gives the absolute number of filters per stage path, one
#: entry for every stage that holds groups; keys that are no stage path are refused.
Rank = int | Mapping[str, int]

_INITS = {"share": ("average", "first", "random", "scaled"), "basis": ("orthogonal", "svd")}


@dataclass(frozen=True)
class SharingOptions:
    """Everything that decides what is shared and how (defaults: ShaResNet).

    Checked on construction like :func:`resolve_options` checks its arguments (``TypeError`` for a wrong type,
    ``ValueError`` for a wrong value); a single selector is accepted for ``positions`` and made a tuple.
    """

    positions: tuple[Selector, ...] = ("last_spatial",)
    skip_first_block: bool = False
    depthwise: bool = False
    method: str = "share"
    shared_rank: Rank | None = None
    unique_rank: Rank | None = None
    init: str = "average"
    align: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        _check_types(asdict(self) | {"positions": self.positions})
        object.__setattr__(self, "positions", _check_positions(self.positions))
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(map(repr, PRESETS))}")
        _check_method_and_init(self.method, self.init)
        if self.method == "basis":
            _check_rank("shared_rank", self.shared_rank)
            _check_rank("unique_rank", self.unique_rank)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (mappings of ranks become dicts)."""
        d = asdict(self)
        d["positions"] = list(self.positions)
        for k in ("shared_rank", "unique_rank"):
            if isinstance(d[k], Mapping):
                d[k] = dict(d[k])
        return d


PRESETS: dict[str, dict[str, Any]] = {
    "sharesnet": {},
    "sharesnet-wrn": {"skip_first_block": True},
    "dsfb-shared": {"skip_first_block": True},
    "dsfb-shared++": {"skip_first_block": True, "positions": ("last_spatial", "last")},
    "dsfb-basis": {"skip_first_block": True, "positions": ("all_spatial",), "method": "basis", "init": "orthogonal"},
    "mobilenetv2-shared": {"skip_first_block": True, "positions": ("first",)},
    "mobilenetv2-shared++": {"skip_first_block": True, "positions": ("first", "last")},
}


def _got(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_flag(name: str, value: object) -> None:
    """Raises ``TypeError`` unless ``value`` is a bool (``inplace="no"`` must not count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}")


def _check_types(options: Mapping[str, Any]) -> None:
    """``TypeError`` for explicit options of the wrong type (``None`` = not given)."""
    for name, value in options.items():
        if value is None:
            continue
        if name in ("skip_first_block", "depthwise", "align"):
            check_flag(name, value)
        elif name in ("preset", "method", "init") and not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {_got(value)}")
        elif name in ("shared_rank", "unique_rank") and not (isinstance(value, (int, Mapping)) and value is not True):
            raise TypeError(f"{name} must be an int or a mapping of stage path -> int, got {_got(value)}")
        elif name == "positions" and (isinstance(value, bool) or not isinstance(value, (str, int, list, tuple))):
            raise TypeError(f"positions must be a selector or a list/tuple of selectors, got {_got(value)}")


def _check_positions(positions: Sequence[Selector] | Selector) -> tuple[Selector, ...]:
    if isinstance(positions, (str, int)):
        positions = (positions,)
    out = tuple(positions)
    if not out:
        raise ValueError(f"positions is empty; pass one or more of {SELECTORS} or conv indices")
    valid = ", ".join(map(repr, SELECTORS))
    for p in out:
        if isinstance(p, bool) or not isinstance(p, (str, int)):
            raise TypeError(f"a position selector is a str ({valid}) or an int index, got {_got(p)}")
        if isinstance(p, str) and p not in SELECTORS:
            raise ValueError(f"unknown position selector {p!r}; valid: {valid} or an int index into the branch's convs")
    seen: dict[Selector, Selector] = {}
    for p in out:
        same = _ALIASES.get(p, p) if isinstance(p, str) else p
        if same in seen:
            twice = f"{p!r} twice" if seen[same] == p else f"{seen[same]!r} and {p!r}, which pick the same conv"
            raise ValueError(f"positions lists {twice}; give each selector once (positions={list(out)!r})")
        seen[same] = p
    return out


def _check_rank(name: str, rank: Rank | None) -> None:
    if rank is None:
        raise ValueError(f"method='basis' needs {name}= (filters per 64 channels, e.g. shared_rank=48, unique_rank=1)")
    if isinstance(rank, Mapping) and not all(isinstance(k, str) for k in rank):
        raise TypeError(f"the keys of {name} must be stage paths (str), got {list(rank)!r}")
    values = rank.values() if isinstance(rank, Mapping) else [rank]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a positive int (or a mapping of stage path -> positive int), got {rank!r}")
        if v <= 0:
            raise ValueError(
                f"{name} must be a positive int (or a mapping of stage path -> positive int), got {rank!r}"
            )


def resolve_options(preset: str | None = None, **explicit: Any) -> SharingOptions:
    """Resolves a preset and explicit options (``None`` = not given) into checked :class:`SharingOptions`.

    An explicit ``method`` that differs from the preset's drops the preset's ``init`` unless ``init``
    is given as well (``preset="dsfb-basis", method="share"`` gets ``init="average"``).

    Raises:
        ValueError: Unknown preset, selector, method or init; a selector given twice; ranks missing or
            not positive.
    """
    given = {k: v for k, v in explicit.items() if v is not None}
    unknown = set(given) - set(SharingOptions.__dataclass_fields__) - {"preset"}
    if unknown:
        raise TypeError(f"unknown sharing option(s): {', '.join(sorted(unknown))}")
    _check_types({**given, "preset": preset})
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(map(repr, PRESETS))}")
    bundle = dict(PRESETS.get(preset or "sharesnet", {}))
    if given.get("method", bundle.get("method", "share")) != bundle.get("method", "share"):
        bundle.pop("init", None)  # the preset's init belongs to its own method; the new method's default applies
    merged = {**bundle, **given}
    method = merged.get("method", "share")
    if method in METHODS and "init" not in merged:
        merged["init"] = _INITS[method][0]
    _check_method_and_init(method, merged.get("init", ""))
    merged["positions"] = _check_positions(merged.get("positions", ("last_spatial",)))
    if method == "basis":
        for name in ("shared_rank", "unique_rank"):
            _check_rank(name, merged.get(name))
    elif merged.get("shared_rank") is not None or merged.get("unique_rank") is not None:
        raise ValueError("shared_rank/unique_rank only apply to method='basis'")
    if merged.get("align") and merged["init"] in ("random", "orthogonal"):
        raise ValueError(
            f"align=True orders the members' channels alike before their weights are combined; init={merged['init']!r} "
            "does not use the members' weights: use init='average', 'scaled' or 'first' ('svd' for method='basis')"
        )
    return SharingOptions(**merged, preset=preset)


def _check_method_and_init(method: str, init: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(map(repr, METHODS))}")
    if init not in _INITS[method]:
        raise ValueError(f"unknown init {init!r} for method={method!r}; valid: {', '.join(map(repr, _INITS[method]))}")


def resolve_leaf_modules(model: nn.Module, leaf_modules: object) -> tuple[type[nn.Module] | str, ...]:
    """Checks a ``leaf_modules=`` spec against ``model`` and returns it as a tuple.

    A bare string is one module path and a bare class one class (never iterated); every path must name a
    submodule of ``model`` (an alias path becomes the module's first path, the one torch.fx traces it under).

    Raises:
        TypeError: An entry that is neither an ``nn.Module`` class nor a path (a module instance, a class that
            is not a module, ...), or a spec that is not a list/tuple/set of them.
        ValueError: A path that names no submodule (with the closest paths that do) or the root.
    """
    if leaf_modules is None:
        return ()
    if isinstance(leaf_modules, (str, type, nn.Module)):
        leaf_modules = (leaf_modules,)  # one path or class (a module instance gets its own error below)
    if isinstance(leaf_modules, (Mapping, bytes)) or not isinstance(leaf_modules, Iterable):
        raise TypeError(
            f"leaf_modules must be a module path, a module class or a list of them, got {_got(leaf_modules)}"
        )
    spec = tuple(leaf_modules)
    paths = [p for p, _ in model.named_modules(remove_duplicate=False) if p]
    aliases = module_paths(model)
    out: list[type[nn.Module] | str] = []
    for x in spec:
        if isinstance(x, str):
            if x not in paths:
                close = difflib.get_close_matches(x, paths, n=3)
                hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "see model.named_modules()"
                what = "the root (the model itself)" if not x else f"no submodule of {type(model).__name__}"
                raise ValueError(f"leaf_modules names {x!r}, which is {what}; {hint}")
        elif isinstance(x, nn.Module):
            raise TypeError(
                f"leaf_modules takes module classes or paths, got a {type(x).__name__} instance; pass its path or "
                f"its class ({type(x).__name__})"
            )
        elif not (isinstance(x, type) and issubclass(x, nn.Module)):
            raise TypeError(f"leaf_modules takes nn.Module classes or module paths (str), got {_got(x)}")
        # A module registered under several paths is traced under its first one.
        out.append(aliases[id(model.get_submodule(x))][0] if isinstance(x, str) else x)
    return tuple(out)
