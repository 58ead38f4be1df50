"""The plan of a model whose own forward cannot be traced, from the plans of its parts.

:func:`sharify.analysis.descend.plan_parts` analyses the largest submodules that trace, each with the inputs a
recorded run of the root gave it; here their options are made relative to each part
(:func:`part_options`) and their stages and groups made relative to the root again (:func:`prefixed`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..analysis.descend import join_path, prefixed_stage
from ..analysis.residual import Stage
from .options import SharingOptions
from .rules import SharingGroup

__all__ = ["part_options", "prefixed"]


def part_options(options: SharingOptions, path: str) -> SharingOptions:
    """``options`` for the submodule at ``path``: rank mappings keyed by root-relative stage paths (and group keys)
    made relative."""

    def relative(rank: Any) -> Any:
        if not isinstance(rank, Mapping):
            return rank
        return {k[len(path) + 1 :]: v for k, v in rank.items() if k.startswith(path + ".")}

    return dataclasses.replace(
        options,
        shared_rank=relative(options.shared_rank),
        unique_rank=relative(options.unique_rank),
        delta_rank=relative(options.delta_rank),
    )


def _prefixed_group(group: SharingGroup, path: str) -> SharingGroup:
    def slot(s: Any) -> Any:
        if s is None:
            return None
        return dataclasses.replace(
            s,
            producer=join_path(path, s.producer),
            consumer=join_path(path, s.consumer),
            norms=tuple(join_path(path, n) for n in s.norms),
        )

    return dataclasses.replace(
        group,
        key=join_path(path, group.key),
        stage=join_path(path, group.stage),
        members=tuple(join_path(path, m) for m in group.members),
        norms=tuple(None if n is None else join_path(path, n) for n in group.norms),
        slots=tuple((slot(a), slot(b)) for a, b in group.slots),
    )


def prefixed(parts: list[tuple[str, Any]]) -> tuple[list[Stage], list[SharingGroup], dict[str, str], list[str]]:
    """The parts' stages, groups, auto leaves and notes, with paths relative to the root."""
    stages: list[Stage] = []
    groups: list[SharingGroup] = []
    auto_leaves: dict[str, str] = {}
    notes: list[str] = []
    for path, part in parts:
        stages += [prefixed_stage(s, path) for s in part.stages]
        groups += [_prefixed_group(g, path) for g in part.groups]
        auto_leaves.update({join_path(path, p): r for p, r in part.auto_leaves.items()})
        notes += [f"{n} (in submodule `{path}`)" for n in part.notes]
    return stages, groups, auto_leaves, notes
