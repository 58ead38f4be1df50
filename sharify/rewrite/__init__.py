"""Rewrite: apply a plan to the model's own module tree, and undo it.

Reads a model and its :class:`~sharify.planning.plan.SharingPlan`; produces the same model (same class, same
module paths) whose member convs read one shared tensor from a holder in the model's ``sharify_shared`` store
(:mod:`sharify.layers` defines the holder, store and member classes). :mod:`~sharify.rewrite.apply` holds
:func:`sharify.sharify`, :func:`sharify.apply_plan` (all edits computed first, applied with one undo log, so a
failure leaves the model as it was) and :func:`sharify.unshare`; the shared tensor's initial value comes from
:mod:`~sharify.rewrite.init` (average, first, scaled, random), :mod:`~sharify.rewrite.align` (channel
alignment maths) and :mod:`~sharify.rewrite.basis` (filter bases and their orthogonality loss);
:mod:`~sharify.rewrite.verify` checks and repairs the ties after operations that break them.
"""

from .apply import apply_plan, sharify, unshare
from .verify import retie, verify

__all__ = ["apply_plan", "retie", "sharify", "unshare", "verify"]
