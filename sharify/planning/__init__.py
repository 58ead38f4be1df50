"""Planning: which convs share one tensor, decided from an analysis and the sharing options.

Reads an :class:`~sharify.analysis.analyse.Analysis` and a :class:`~sharify.planning.options.SharingOptions`
(:mod:`~sharify.planning.options`: the options, their presets, documentation, command-line form and
validation, declared once as its fields) and the modules not to trace into (:mod:`~sharify.planning.leaves`);
produces a :class:`~sharify.planning.plan.SharingPlan` -- the groups of convs that will share, with their signatures,
the basis ranks and the exact parameter counts before and after -- without changing the model. The sharing
rule is in :mod:`~sharify.planning.rules` (a conv's signature, the selectors ``last_spatial``, ``first``,
..., basis ranks), forming the groups of each stage in :mod:`~sharify.planning.grouping` (convs that cannot
be members, refusal hints that are tried before they are suggested), and the entry point
:func:`sharify.plan` in :mod:`~sharify.planning.plan`. The package is called ``planning`` so that
``sharify.plan`` stays the function.
"""

from .options import PRESETS, SharingOptions
from .plan import SharingPlan, check_model, count_params, make_plan, plan

__all__ = ["PRESETS", "SharingOptions", "SharingPlan", "check_model", "count_params", "make_plan", "plan"]
