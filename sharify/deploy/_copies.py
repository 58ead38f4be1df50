"""Finding a sharified model's shared tensors among the tensors an exported file stores.

A file keeps the sharing when each shared weight is stored once. An exporter can break it in two ways:
storing the tensor once per member (an exact copy each), or folding each member's BatchNorm into its conv
and storing the products (a copy scaled per output channel each: ``diag(gamma / sigma) W``). Both are
found by comparing every stored tensor of the shared weight's shape with it: *exact* when equal, *scaled*
when, row by row (one row per output channel), it is a multiple of the shared weight up to the rounding
of its dtype. With a BatchNorm's default statistics every member's scale is the same, so an exporter's
deduplication merges the folded copies into one; test with randomised statistics.

The shared weight of an int8 model (:func:`sharify.quantize_int8`) is its holder's int8 tensor
(``weight_int8``): a file keeps the sharing when it stores that tensor once, as int8. A float copy of it
(the dequantised weight folded into a constant, possibly scaled by a member's BatchNorm) is a copy too, and
is also listed as *dequantised*: the file stores it at four times the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers import holder_paths, shared_groups

__all__ = ["TensorCopies", "copies_message", "find_copies", "shared_weights"]

#: Relative residual ``||A - diag(s) W|| / ||A||`` under which a stored tensor ``A`` counts as a copy of a
#: shared weight ``W``, by the stored tensor's dtype: a few hundred times the rounding of a per-channel
#: product in float32 (float64 too: the shared weight itself is float32), that of a half-precision copy,
#: and that of a per-channel int8 quantisation (rounding error at most half a step of ``max|row| / 127``).
#: An unrelated tensor leaves a residual near 1.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.int8: 5e-2}


@dataclass(frozen=True)
class TensorCopies:
    """Where one shared weight is stored in an exported file.

    Attributes:
        key: The sharing group's key (``"layer1.conv2"``).
        name: The weight's ``state_dict`` name in the model (``"sharify_shared.layer1.conv2.weight"``).
        shape: Its shape.
        exact: Names of the stored tensors equal to it.
        scaled: Names of the stored tensors equal to it up to a per-output-channel scale (a BatchNorm
            folded into a member).
        dequantised: Names of the stored floating-point copies of an int8 shared weight (among ``scaled``).
    """

    key: str
    name: str
    shape: tuple[int, ...]
    exact: tuple[str, ...]
    scaled: tuple[str, ...]
    dequantised: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """How many times the file stores the weight (1 when the sharing is kept)."""
        return len(self.exact) + len(self.scaled)


def shared_weights(model: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """The shared weight of each group of ``model`` with its ``state_dict`` name, by group key: the holder's
    ``weight``, or its ``weight_int8`` when :func:`sharify.quantize_int8` stored it as int8."""
    paths = holder_paths(model)
    out = {}
    for key, (holder, _) in shared_groups(model).items():
        q = holder._buffers.get("weight_int8")
        out[key] = (f"{paths[key]}.weight_int8", q) if q is not None else (f"{paths[key]}.weight", holder.weight)
    return {key: (name, w.detach()) for key, (name, w) in out.items()}


def _relation(stored: Tensor, shared: Tensor) -> str | None:
    """``"exact"``, ``"scaled"`` (per output channel) or ``None``: how ``stored`` relates to ``shared``."""
    if stored.numel() != shared.numel() or stored.shape[:1] != shared.shape[:1]:
        return None
    if stored.dtype == shared.dtype and torch.equal(stored.reshape(shared.shape), shared):
        return "exact"
    tol = TOLERANCE.get(stored.dtype)
    rows = shared.shape[0] if shared.dim() else 1
    if tol is None or shared.numel() <= rows:  # one value per channel: any vector is a "scaled copy"
        return None
    a, w = stored.reshape(rows, -1).double(), shared.reshape(rows, -1).double()
    norm = a.norm()
    if norm == 0:
        return None
    scale = (a * w).sum(1) / w.square().sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    return "scaled" if (a - scale[:, None] * w).norm() <= tol * norm else None


def find_copies(model: nn.Module, stored: Mapping[str, Tensor]) -> tuple[TensorCopies, ...]:
    """The copies of each shared weight of ``model`` among the ``stored`` tensors of an exported file.

    Args:
        model: The sharified model that was exported.
        stored: The file's tensors by name (for ONNX its initializers and constants).
    """
    out = []
    for key, (name, weight) in shared_weights(model).items():
        weight = weight.cpu()
        found: dict[str, list[str]] = {"exact": [], "scaled": [], "dequantised": []}
        for stored_name, tensor in stored.items():
            relation = _relation(tensor, weight)
            if relation is not None:
                found[relation].append(stored_name)
                if weight.dtype == torch.int8 and tensor.is_floating_point():
                    found["dequantised"].append(stored_name)
        exact, scaled, dequantised = (tuple(found[k]) for k in ("exact", "scaled", "dequantised"))
        out.append(TensorCopies(key, name, tuple(weight.shape), exact, scaled, dequantised))
    return tuple(out)


def copies_message(copies: Sequence[TensorCopies], what: str, fix: str) -> str | None:
    """What is wrong with the copies of the shared weights in ``what`` (a file's description), ``None`` if nothing.

    Args:
        copies: The copies, as :func:`find_copies` gives them.
        what: The file, e.g. ``"the ONNX file model.onnx"``.
        fix: What to do about duplicates.
    """
    duplicated = [c for c in copies if c.count > 1]
    missing = [c for c in copies if c.count == 0]
    parts = []
    if duplicated:
        shown = "; ".join(
            f"`{c.name}` ({'x'.join(map(str, c.shape))}) {c.count} times: "
            + ", ".join([*c.exact, *(f"{n} (scaled per channel)" for n in c.scaled)])
            for c in duplicated[:4]
        )
        more = f"; and {len(duplicated) - 4} more" if len(duplicated) > 4 else ""
        scaled = any(c.scaled for c in duplicated)
        folded = " (scaled per output channel: a BatchNorm or a gain folded into each member)" if scaled else ""
        parts.append(
            f"{what} stores {len(duplicated)} of {len(copies)} shared tensors more than once{folded}: {shown}{more}; "
            f"{fix}"
        )
    floats = [c for c in copies if c.count == 1 and c.dequantised]
    if floats:
        shown = ", ".join(f"`{c.name}` as {c.dequantised[0]}" for c in floats[:4]) + (" ..." if len(floats) > 4 else "")
        parts.append(
            f"{what} stores {len(floats)} of {len(copies)} int8 shared tensors as floating point (dequantised into "
            f"a constant, four times the bytes): {shown}; {fix}"
        )
    if missing:
        names = ", ".join(f"`{c.name}`" for c in missing[:4]) + (" ..." if len(missing) > 4 else "")
        parts.append(
            f"{what} stores no copy of {len(missing)} shared tensors ({names}): the exporter transformed them, so "
            "the check cannot tell whether they are stored once; export the model in eval mode, quantised (if at "
            "all) by sharify.quantize_int8, or pass check=False"
        )
    return "; ".join(parts) or None
