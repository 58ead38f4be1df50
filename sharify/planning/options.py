"""The sharing options, and the named presets of the published variants.

:class:`SharingOptions` is the one place an option is declared, documented and checked: each field carries
its documentation and its command-line form in its ``metadata`` (``"doc"``, ``"help"``, ``"default"``,
``"cli"``), from which the class docstring, ``sharify report --help`` / ``sharify finetune --help``
(:mod:`sharify.cli`) and the checks of :func:`sharify.sharify` / :func:`sharify.plan` follow.

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
``minivit``                 every Linear of attention and MLP branches, shared by runs of two
                            consecutive blocks (MiniViT: Mini-DeiT-Ti/S/B, Mini-Swin-S/B; Mini-Swin-T
                            shares whole stages: ``preset="minivit", group_size=0``)
==========================  ==================================================================
"""

from __future__ import annotations

import difflib
import inspect
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from .._argtypes import delta_rank_arg, fraction_arg, positive_int

__all__ = [
    "DEFAULT_PRESET",
    "LINEAR_SELECTORS",
    "METHODS",
    "PRESETS",
    "SELECTORS",
    "BasisInit",
    "DeltaRank",
    "Init",
    "Method",
    "NamedSelector",
    "Rank",
    "Selector",
    "ShareInit",
    "SharingOptions",
    "check_flag",
    "check_method_and_init",
    "check_option_names",
    "option_fields",
    "option_flag",
    "selector_arg",
    "sharing_options",
]

#: A selector by name: the last / every spatial (kernel > 1) conv of the branch, its first or its last conv; or the
#: ``nn.Linear`` layers of attention branches (``"attn"``: qkv and output projection), of other branches
#: (``"mlp"``: fc1 and fc2, Mixer's token MLP), or of both (``"all_linear"``).
NamedSelector = Literal["last_spatial", "all_spatial", "first", "last", "attn", "mlp", "all_linear"]
#: A position selector: a :data:`NamedSelector` or an index into the branch's convs.
Selector = NamedSelector | int
SELECTORS: tuple[str, ...] = get_args(NamedSelector)
#: The selectors that pick a branch's ``nn.Linear`` layers (the others pick its convs).
LINEAR_SELECTORS: tuple[str, ...] = ("attn", "mlp", "all_linear")
_ALIASES: dict[str, int] = {"first": 0, "last": -1}  # selectors that are conv indices
#: ``"share"``: members share one conv weight (ShaResNet). ``"basis"``: members share a filter basis (DSFB).
Method = Literal["share", "basis"]
METHODS: tuple[str, ...] = get_args(Method)
#: The inits of ``method="share"`` (the first is its default) and of ``method="basis"``.
ShareInit = Literal["average", "first", "random", "scaled"]
BasisInit = Literal["orthogonal", "svd"]
Init = Literal[ShareInit, BasisInit]
_INITS: dict[str, tuple[str, ...]] = {"share": get_args(ShareInit), "basis": get_args(BasisInit)}
#: A basis rank: an int counts filters per 64 channels (the paper's ``m = C/64`` scaling): a conv with ``C``
#: output channels gets ``max(1, floor(rank * C / 64 + 1/2))`` filters (rounded half up, at least one; see
#: :func:`sharify.planning.rules.scaled_rank`). A mapping gives the absolute number of filters per stage path, one
#: entry for every stage that holds groups; keys that are no stage path are refused.
Rank = int | Mapping[str, int]
#: A low-rank delta's rank (relaxed sharing): an int (0: none), ``"full"`` (``min(out, in/groups * kh * kw)``,
#: which reproduces every member exactly), or ``{stage path or group key: int or "full"}``; a group's own key
#: takes precedence over its stage's path, and a group in neither gets no delta.
DeltaRank = int | Literal["full"] | Mapping[str, int | Literal["full"]]

#: The named variants of the papers (the table above): the values they give the options they set.
PRESETS: dict[str, dict[str, Any]] = {
    "sharesnet": {},
    "sharesnet-wrn": {"skip_first_block": True},
    "dsfb-shared": {"skip_first_block": True},
    "dsfb-shared++": {"skip_first_block": True, "positions": ("last_spatial", "last")},
    "dsfb-basis": {"skip_first_block": True, "positions": ("all_spatial",), "method": "basis", "init": "orthogonal"},
    "mobilenetv2-shared": {"skip_first_block": True, "positions": ("first",)},
    "mobilenetv2-shared++": {"skip_first_block": True, "positions": ("first", "last")},
    "minivit": {"positions": ("all_linear",), "group_size": 2},
}
#: The preset that applies when none is given; it sets nothing, so the fields' defaults apply.
DEFAULT_PRESET = "sharesnet"


def selector_arg(text: str) -> Selector:
    """An argparse type: a conv index when ``text`` is an integer, else a selector name (checked later)."""
    try:
        return int(text)
    except ValueError:
        return text  # type: ignore[return-value]  # SharingOptions names the valid selectors


#: The dataclass default of every option: not given, so the preset's value or the field's ``metadata["default"]``
#: applies (typed ``Any`` because the field holds its value, never ``None``, once constructed).
_UNSET: Any = None


def _meta(default: Any = None, *, doc: str, help: str, **cli: Any) -> dict[str, Any]:
    """The metadata of a field of :class:`SharingOptions` (whose own default is ``None``: not given).

    Args:
        default: The value when neither the caller nor the preset gives one (``None``: see ``doc``).
        doc: Its documentation (the class docstring's ``Attributes:`` entry).
        help: Its one-line ``--help`` text on the command line.
        **cli: Further :meth:`argparse.ArgumentParser.add_argument` keywords of its flag (``choices``,
            ``type``, ``nargs``, ``metavar``, ``action``).
    """
    return {"doc": doc, "help": help, "default": default, "cli": cli}


@dataclass(frozen=True, kw_only=True)
class SharingOptions:
    """Everything that decides what is shared and how: the options of :func:`sharify.sharify` / :func:`sharify.plan`.

    ``sharify(model, positions=("first",))`` is ``sharify(model, SharingOptions(positions=("first",)))``. A field
    left ``None`` takes the preset's value, else its default; once constructed, every field but ``preset`` holds
    its value. Checked on construction: ``TypeError`` for a wrong type, ``ValueError`` for a wrong value (naming
    the valid ones); a single selector is accepted for ``positions`` and made a tuple.

    Example:
        >>> from sharify import SharingOptions
        >>> options = SharingOptions(preset="dsfb-basis", shared_rank=48, unique_rank=1)
        >>> options.skip_first_block, options.positions, options.init
        (True, ('all_spatial',), 'orthogonal')
        >>> SharingOptions.from_dict(options.to_dict()) == options
        True
    """

    positions: tuple[Selector, ...] = field(
        default=_UNSET,
        metadata=_meta(
            ("last_spatial",),
            doc="Which conv(s) of each block's residual branch to share, each selector forming its own groups: "
            '``"last_spatial"`` (ShaResNet), ``"all_spatial"``, ``"first"``, ``"last"`` or an index into the '
            "branch's convs; for transformer and MLP blocks, whose branches hold ``nn.Linear`` layers, "
            '``"attn"`` (every Linear of an attention branch: qkv or q, k, v, and the output projection), '
            '``"mlp"`` (every Linear of another branch: fc1, fc2) or ``"all_linear"`` (both); each Linear of a '
            "branch is its own position (``attn0``, ``attn1``, ...). Every selector picks from the branch's full list "
            "of convs; a pick an earlier selector "
            'already put in a group is skipped, not replaced (on a basic block ``"last"`` is the ``"last_spatial"`` '
            "conv2, so ``dsfb-shared++`` adds no group there), and so is a pick that cannot be a member (a conv "
            "called more than once, tied to another module's Parameter, or with a parametrized / ``weight_norm`` "
            'weight), which ``plan.notes`` names with the reason. A selector given twice (``"first"`` and ``0``, '
            '``"last"`` and ``-1`` count as one) and an index out of range for every branch raise ``ValueError``; '
            "an index that fits only the longer branches picks nothing in the shorter ones.",
            help="branch layers to share: last_spatial (default), all_spatial, first, last, index; attn, mlp, "
            "all_linear",
            nargs="+",
            type=selector_arg,
            metavar="SEL",
        ),
    )
    group_size: int = field(
        default=_UNSET,
        metadata=_meta(
            0,
            doc="Share within runs of this many consecutive members of a stage (``2``: blocks 0-1, 2-3, ... share "
            "one tensor each, MiniViT's pattern; a last run of one member stays unshared); ``0`` shares the whole "
            "stage (ShaResNet's rule).",
            help="share within runs of N consecutive blocks of a stage (0: the whole stage, default)",
            type=int,
            metavar="N",
        ),
    )
    skip_first_block: bool = field(
        default=_UNSET,
        metadata=_meta(
            False,
            doc="Leave each stage's first block unshared (the paper's WRN rows and DSFB do): the first block with the "
            "stage's output shape, residual or not (after a non-residual entry block, as in MobileNetV2, every "
            "residual block is shared); before the network's first residual block, only a block beside it in its "
            "container counts (MobileNetV2's ``features.2``); the stem does not, so ResNet-34's ``layer1.0`` is first.",
            help="leave stages' first blocks out",
            action="store_true",
        ),
    )
    depthwise: bool = field(
        default=_UNSET,
        metadata=_meta(
            False,
            doc="Let depthwise convs be members.",
            help="let depthwise convs be shared",
            action="store_true",
        ),
    )
    method: Method = field(
        default=_UNSET,
        metadata=_meta(
            "share",
            doc='``"share"``: members share one weight; ``"basis"``: each member becomes unique basis + shared basis '
            "-> BatchNorm -> 1x1 coefficients (Deeply Shared Filter Bases; needs ``shared_rank`` and "
            "``unique_rank``). A method other than the preset's also drops the preset's ``init``.",
            help="share whole convs (default) or filter bases",
            choices=list(METHODS),
        ),
    )
    shared_rank: Rank | None = field(
        default=_UNSET,
        metadata=_meta(
            doc='``method="basis"`` only (and needed there): shared basis filters per 64 channels (a conv with ``C`` '
            "outputs gets ``max(1, floor(shared_rank * C / 64 + 1/2))``, rounded half up), or ``{stage path: "
            "filters}`` with an entry for every stage that holds groups and no other keys.",
            help="basis: shared filters per 64 channels",
            type=positive_int,
        ),
    )
    unique_rank: Rank | None = field(
        default=_UNSET,
        metadata=_meta(
            doc='``method="basis"`` only (and needed there): unique basis filters per 64 channels, rounded as '
            "``shared_rank``, or ``{stage path: filters}``.",
            help="basis: unique filters per 64 channels",
            type=positive_int,
        ),
    )
    init: Init = field(
        default=_UNSET,
        metadata=_meta(
            doc='The initial shared tensors. ``method="share"``: ``"average"`` (its default; with pretrained '
            'weights the paper\'s averaged init), ``"first"``, ``"random"``, or ``"scaled"`` (a shared tensor plus '
            "per-member per-channel gains, folded into the BatchNorm after each member, else kept as its "
            '``shared_gain`` parameter; the only init that changes the plan\'s arithmetic). ``method="basis"``: '
            '``"orthogonal"`` (its default) or ``"svd"`` (from the members\' weights).',
            help="share: average (default), first, random, scaled; basis: orthogonal (default), svd",
        ),
    )
    align: bool = field(
        default=_UNSET,
        metadata=_meta(
            False,
            doc="Before combining the members' weights, permute each member's hidden channels (those it exchanges "
            "with another conv of its block through BatchNorm/activations only; the plan's ``group.slots``) to "
            "match the other members -- a change that leaves the original model's function exactly as it was, "
            'and makes ``init="average"``/``"scaled"``/``"first"``/``"svd"`` combine like channels '
            "(:mod:`sharify.rewrite.align`; needs scipy). Off by default, as in the papers; the plan's arithmetic "
            'is the same. Refused with ``init="random"``/``"orthogonal"``, which do not use the weights.',
            help="align the members' hidden channels before combining their weights (needs scipy)",
            action="store_true",
        ),
    )
    delta_rank: DeltaRank = field(
        default=_UNSET,
        metadata=_meta(
            0,
            doc='``method="share"`` only: relaxed sharing. Each member computes with ``W_shared + B_i @ A_i`` (the '
            "weight viewed as ``(out, in/groups * kh * kw)``; ``B_i`` is ``(out, r)``, ``A_i`` is ``(r, in/groups * "
            "kh * kw)``), a low-rank delta it owns, initialised from the truncated SVD of what the shared weight "
            'misses of it (after ``align`` and ``init``; with ``init="scaled"``, of the member\'s weight divided by '
            'its gains); with a bias, each member also owns the difference of its bias. ``"full"`` '
            "reproduces the original model exactly; the error falls with the rank. Costs ``r * (out + in/groups * "
            'kh * kw)`` parameters per member (+ ``out`` with a bias). An int, ``"full"``, or ``{stage path or group '
            'key: int or "full"}``. Not with ``param_budget``.',
            help='relaxed sharing: rank of each member\'s low-rank delta (int or "full")',
            type=delta_rank_arg,
            metavar="RANK",
        ),
    )
    param_budget: float | None = field(
        default=_UNSET,
        metadata=_meta(
            doc='``method="share"`` only: a fraction of the original model\'s parameters (e.g. ``0.7``) to spend. '
            "The members get low-rank deltas (as ``delta_rank``) whose per-group ranks capture the most of what "
            "sharing misses (each member's squared error relative to its own weight, summed) within the budget, "
            "chosen greedily from the singular values when the model is sharified. A budget below what full "
            "sharing reaches is refused with the smallest possible figure. The sharified model records the ranks "
            "chosen (its options' ``delta_rank``), not the budget. Not with ``delta_rank``.",
            help="relaxed sharing: fraction of the original's parameters to keep (chooses delta ranks)",
            type=fraction_arg,
            metavar="FRACTION",
        ),
    )
    preset: str | None = field(
        default=_UNSET,
        metadata=_meta(
            doc="A published variant of the papers (:data:`sharify.planning.options.PRESETS`), e.g. "
            '``"sharesnet-wrn"``, ``"dsfb-shared++"``, whose values the fields left ``None`` take; with none, '
            '``"sharesnet"``, whose values are the defaults. Recorded as given (``None`` when not given).',
            help="a published variant (default: sharesnet)",
            choices=sorted(PRESETS),
        ),
    )

    def __post_init__(self) -> None:
        explicit = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "preset"}
        for name, value in _resolve(self.preset, explicit).items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (mappings of ranks become dicts); :meth:`from_dict` reads it back."""
        d = asdict(self)
        d["positions"] = list(self.positions)
        for k in ("shared_rank", "unique_rank", "delta_rank"):
            if isinstance(d[k], Mapping):
                d[k] = dict(d[k])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SharingOptions:
        """The options of a :meth:`to_dict` (e.g. a recipe's ``options``); missing keys take the preset's value.

        Raises:
            TypeError: ``data`` is no mapping, or has a key that is no option (the message names the closest).
            ValueError: A value :class:`SharingOptions` refuses.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"SharingOptions.from_dict expects a mapping of option -> value, got {_got(data)}")
        check_option_names(data, caller="SharingOptions.from_dict()")
        return cls(**data)


def _document(cls: type[SharingOptions]) -> None:
    """Appends the fields' ``doc`` metadata to the class docstring as its ``Attributes:`` section."""
    lines = [inspect.cleandoc(cls.__doc__ or ""), "", "Attributes:"]
    for f in fields(cls):
        default = f.metadata["default"]
        shown = "" if default is None else f" Default: ``{default!r}``.".replace("'", '"')
        lines += textwrap.wrap(f"{f.name}: {f.metadata['doc']}{shown}", 116, initial_indent="    ",
                               subsequent_indent="        ", break_on_hyphens=False)  # fmt: skip
    cls.__doc__ = "\n".join(lines)


_document(SharingOptions)


def option_fields() -> tuple[Field[Any], ...]:
    """The fields of :class:`SharingOptions`, ``preset`` first: the order of the command line's flags."""
    found = fields(SharingOptions)
    return tuple(sorted(found, key=lambda f: f.name != "preset"))


def option_flag(name: str) -> str:
    """The command-line flag of the option ``name``: ``skip_first_block`` -> ``--skip-first-block``."""
    return "--" + name.replace("_", "-")


def _got(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_flag(name: str, value: object) -> None:
    """Raises ``TypeError`` unless ``value`` is a bool (``inplace="no"`` must not count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}")


def check_option_names(names: Iterable[str], *, caller: str, others: Sequence[str] = ()) -> None:
    """Raises ``TypeError`` for a keyword that is neither an option nor one of ``others`` (``caller``'s own).

    The message names the closest valid keyword (:func:`difflib.get_close_matches`) and lists the options.
    """
    valid = [f.name for f in fields(SharingOptions)]
    unknown = [n for n in names if n not in valid]
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(str(name), [*valid, *others], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    own = f"; {caller}'s other arguments: {', '.join(others)}" if others else ""
    raise TypeError(
        f"{caller} got an unexpected keyword argument {name!r}{hint}; the sharing options (fields of "
        f"sharify.SharingOptions) are {', '.join(valid)}{own}"
    )


def sharing_options(
    options: SharingOptions | None,
    preset: str | None,
    overrides: Mapping[str, Any],
    *,
    caller: str,
    others: Sequence[str] = (),
) -> SharingOptions:
    """The :class:`SharingOptions` of a call ``caller(model, options, preset=..., **overrides)``.

    Without ``options``: ``SharingOptions(preset=preset, **overrides)``. With them, ``overrides`` (``None``:
    not given) replace their fields, and a ``method`` other than theirs drops their ``init`` and ranks unless
    those are given too (as a preset's ``init`` is dropped).

    Raises:
        TypeError: An unknown keyword in ``overrides`` (see :func:`check_option_names`); ``options`` that are
            no :class:`SharingOptions`, or given together with ``preset``; an option of the wrong type.
        ValueError: A value :class:`SharingOptions` refuses.
    """
    check_option_names(overrides, caller=caller, others=others)
    if options is None:
        return SharingOptions(preset=preset, **overrides)
    if not isinstance(options, SharingOptions):
        if isinstance(options, Mapping):
            hint = (
                f"; pass SharingOptions.from_dict(options) or the options as keywords ({caller[:-2]}(model, **options))"
            )
        elif type(options).__name__ == "SharingPlan":
            hint = "; to apply a plan, call sharify.apply_plan(model, plan)"
        else:
            hint = "; build one (SharingOptions(positions=..., ...)) or pass the options as keywords"
        raise TypeError(f"{caller} takes a sharify.SharingOptions as options, got {type(options).__name__}{hint}")
    if preset is not None:
        raise TypeError(
            f"{caller} got both options and preset={preset!r}; put the preset in the options "
            f"(SharingOptions(preset={preset!r}, ...)) or pass the options as keywords"
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return options
    base = {f.name: getattr(options, f.name) for f in fields(options)}
    if "param_budget" in given:
        base.pop("delta_rank")  # a budget chooses the ranks itself
    if "delta_rank" in given:
        base.pop("param_budget")
    if given.get("method", options.method) != options.method:
        for name in ("init", "shared_rank", "unique_rank"):
            base.pop(name)  # they belong to the old method; the new method's defaults apply unless given
    return SharingOptions(**{**base, **given})


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
        elif name == "delta_rank" and not (
            (isinstance(value, (int, Mapping)) and value is not True and value is not False) or value == "full"
        ):
            raise TypeError(
                f'delta_rank must be an int, "full" or a mapping of stage path / group key -> rank, got {_got(value)}'
            )
        elif name == "param_budget" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(
                f"param_budget must be a fraction of the original's parameters (a float), got {_got(value)}"
            )
        elif name == "group_size" and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"group_size must be an int (0: the whole stage), got {_got(value)}")
        elif name == "positions" and (isinstance(value, bool) or not isinstance(value, (str, int, list, tuple))):
            raise TypeError(f"positions must be a selector or a list/tuple of selectors, got {_got(value)}")


def _resolve(preset: str | None, explicit: Mapping[str, Any]) -> dict[str, Any]:
    """Every option but ``preset``: the explicit ones (``None`` = not given), else the preset's, else the default.

    An explicit ``method`` that differs from the preset's drops the preset's ``init`` unless ``init``
    is given as well (``preset="dsfb-basis", method="share"`` gets ``init="average"``).
    """
    given = {k: v for k, v in explicit.items() if v is not None}
    _check_types({**given, "preset": preset})
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(map(repr, PRESETS))}")
    defaults = {f.name: f.metadata["default"] for f in fields(SharingOptions) if f.name != "preset"}
    bundle = dict(PRESETS[preset or DEFAULT_PRESET])
    if given.get("method", bundle.get("method", defaults["method"])) != bundle.get("method", defaults["method"]):
        bundle.pop("init", None)  # the preset's init belongs to its own method; the new method's default applies
    merged = {**defaults, **bundle, **given}
    method = merged["method"]
    if merged["init"] is None and method in METHODS:
        merged["init"] = _INITS[method][0]
    check_method_and_init(method, merged["init"])
    merged["positions"] = _check_positions(merged["positions"])
    if method == "basis":
        for name in ("shared_rank", "unique_rank"):
            _check_rank(name, merged[name])
    elif merged["shared_rank"] is not None or merged["unique_rank"] is not None:
        raise ValueError("shared_rank/unique_rank only apply to method='basis'")
    _check_relaxed(merged, given)
    if merged["group_size"] < 0 or merged["group_size"] == 1:
        raise ValueError(
            f"group_size={merged['group_size']} shares nothing; pass 2 or more (runs of that many consecutive blocks "
            "share one tensor) or 0 (the whole stage)"
        )
    if merged["align"] and merged["init"] in ("random", "orthogonal"):
        raise ValueError(
            f"align=True orders the members' channels alike before their weights are combined; init={merged['init']!r} "
            "does not use the members' weights: use init='average', 'scaled' or 'first' ('svd' for method='basis')"
        )
    return merged


def _check_relaxed(merged: dict[str, Any], given: Mapping[str, Any]) -> None:
    """Checks ``delta_rank`` and ``param_budget`` (relaxed sharing) against each other and the method."""
    delta, budget = merged["delta_rank"], merged["param_budget"]
    if merged["method"] != "share" and (delta or budget is not None):
        name = "delta_rank" if delta else "param_budget"
        raise ValueError(
            f"{name} relaxes whole-conv sharing (method='share'); method={merged['method']!r} shares a filter basis, "
            "whose members already own their unique filters: drop it or use method='share'"
        )
    if budget is not None and given.get("delta_rank"):
        raise ValueError(
            "param_budget chooses the delta ranks; pass either param_budget (a fraction of the original's "
            "parameters) or delta_rank (explicit ranks), not both"
        )
    if budget is not None and not (math.isfinite(budget) and 0 < budget <= 1):
        hint = f"; for {budget} % pass param_budget={budget / 100:g}" if 1 < budget <= 100 else ""
        raise ValueError(
            f"param_budget must be a fraction of the original's parameters in (0, 1] (0.7 keeps 70 % of them), got "
            f"{budget!r}{hint}"
        )
    ranks = delta.values() if isinstance(delta, Mapping) else [delta]
    if isinstance(delta, Mapping) and not all(isinstance(k, str) for k in delta):
        raise TypeError(f"the keys of delta_rank must be stage paths or group keys (str), got {list(delta)!r}")
    for r in ranks:
        if r != "full" and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f'a delta_rank is an int >= 0 or "full", got {r!r} (delta_rank={delta!r})')
    if isinstance(delta, Mapping):
        merged["delta_rank"] = dict(delta)


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
            close = difflib.get_close_matches(p, SELECTORS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown position selector {p!r}{hint}; valid: {valid} or an int index into the branch's convs"
            )
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


def check_method_and_init(method: object, init: object) -> None:
    """``TypeError`` for a method or init that is no str, ``ValueError`` for one that does not exist."""
    _check_types({"method": method, "init": init})
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(map(repr, METHODS))}")
    if init not in _INITS[method]:
        raise ValueError(f"unknown init {init!r} for method={method!r}; valid: {', '.join(map(repr, _INITS[method]))}")
