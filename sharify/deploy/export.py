"""``torch.export`` programs and ``.pt2`` packages that keep the sharing (:func:`check_export`).

A member conv reads its group's weight through a property, so ``torch.export.export`` lifts each shared
weight once, as one parameter (``sharify_shared.layer1.conv2.weight``) that every member's convolution
takes as input; ``torch.export.save`` writes one archive entry per parameter, so the ``.pt2`` package
stores it once too. :func:`check_export` exports a model and checks both, by value: the program's
parameters, buffers and constants (:func:`shared_constants`), the program loaded back from the package,
and the raw bytes of every entry of the package's zip archive. The package also holds the example inputs
(``torch.export.save`` stores them with the program): 0.6 MB for one 224x224 image.

AOTInductor (``torch._inductor.aoti_compile_and_package``) compiles the program into a shared library with
the weights embedded; it works on the CPU (it needs a C++ compiler) and keeps one copy of each shared
weight in the library, but compiling takes 30 s to a few minutes per model on a small CPU, so
``aoti=True`` is opt-in (and its test is marked ``slow``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ..errors import ExportError
from ..io.atomic import atomic_write
from ._copies import TensorCopies, copies_message, find_copies, shared_weights
from ._model import bare_model, example_inputs_of, export_program, reference_outputs

__all__ = ["ExportCheck", "archive_copies", "check_export", "shared_constants"]

#: Outputs of the loaded program may differ from the model's by ``atol + rtol * max|output|`` (float32): the
#: program runs the same kernels (exactly equal in practice); AOTInductor's generated code sums in another order.
OUTPUT_RTOL, OUTPUT_ATOL = 1e-4, 1e-5

_FIX = (
    "export the model itself (torch.export.export(shared_model, ...)) in eval mode, without rewriting its convs "
    "(conv-BN fusion or freezing give each member its own weight)"
)


@dataclass(frozen=True)
class ExportCheck:
    """What :func:`check_export` found.

    Attributes:
        program: Where each shared weight is stored in the ``ExportedProgram`` (one copy each).
        package: The same in the program loaded back from the ``.pt2`` package.
        archive: Exact copies of each shared weight among the bytes of the package's archive entries.
        package_bytes: Size of the ``.pt2`` package.
        max_abs_diff: Largest difference between the loaded program's outputs and the model's (eval mode).
        tolerance: The difference allowed.
        aoti: Exact copies in the AOTInductor package (``None``: not compiled).
        aoti_bytes: Size of the AOTInductor package (``None``: not compiled).
        path: The ``.pt2`` package written (``None``: a temporary one was checked).
    """

    program: tuple[TensorCopies, ...]
    package: tuple[TensorCopies, ...]
    archive: tuple[TensorCopies, ...]
    package_bytes: int
    max_abs_diff: float
    tolerance: float
    aoti: tuple[TensorCopies, ...] | None = None
    aoti_bytes: int | None = None
    path: str | None = None

    def problems(self) -> list[str]:
        """What is wrong, each with what to do (empty: the check passed)."""
        found = [
            copies_message(self.program, "the ExportedProgram", _FIX),
            copies_message(self.package, "the program loaded from the .pt2 package", _FIX),
            copies_message(self.archive, "the .pt2 package's archive", _FIX),
            copies_message(self.aoti, "the AOTInductor package", _FIX) if self.aoti is not None else None,
        ]
        out = [f for f in found if f]
        if not self.max_abs_diff <= self.tolerance:
            out.append(
                f"the exported program's outputs differ from the model's (eval mode) by up to {self.max_abs_diff:.3g} "
                f"(allowed: {self.tolerance:.3g}); export in eval mode with the inputs the model is used with"
            )
        return out


def shared_constants(program: torch.export.ExportedProgram, model: nn.Module) -> tuple[TensorCopies, ...]:
    """Where each shared weight of ``model`` is stored among ``program``'s parameters, buffers and constants.

    Args:
        program: ``torch.export.export(model, ...)`` (or one loaded with ``torch.export.load``).
        model: The sharified model it was exported from.

    Returns:
        One entry per shared weight; ``count`` is 1 when the program keeps the sharing.

    Example:
        >>> import torch, torchvision, sharify
        >>> from sharify.deploy.export import shared_constants
        >>> shared = sharify.sharify(torchvision.models.resnet18())
        >>> program = torch.export.export(shared.eval(), (torch.randn(1, 3, 64, 64),))
        >>> [(c.key, c.exact) for c in shared_constants(program, shared)][0]
        ('layer1.conv2', ('sharify_shared.layer1.conv2.weight',))
    """
    stored = {k: v for k, v in {**program.state_dict, **program.constants}.items() if isinstance(v, Tensor)}
    return find_copies(bare_model(model, "shared_constants"), stored)


def archive_copies(model: nn.Module, path: str | os.PathLike[str]) -> tuple[TensorCopies, ...]:
    """Exact copies of each shared weight of ``model`` among the bytes of the entries of the zip archive ``path``
    (a ``.pt2`` package), each copy named by its entry (an entry holding two copies is named twice)."""
    weights = {key: (name, w.cpu().contiguous()) for key, (name, w) in shared_weights(model).items()}
    found: dict[str, list[str]] = {key: [] for key in weights}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            for key, (_, w) in weights.items():
                found[key] += [info.filename] * data.count(w.numpy().tobytes())
    return tuple(TensorCopies(k, name, tuple(w.shape), tuple(found[k]), ()) for k, (name, w) in weights.items())


def _difference(expected: Sequence[Tensor], out: Any) -> tuple[float, float]:
    got = [x.detach().cpu() for x in pytree.tree_leaves(out) if isinstance(x, Tensor)]
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        return float("inf"), 0.0
    diff = max(((g.double() - e.double()).abs().max().item() for g, e in zip(got, expected) if e.numel()), default=0.0)
    scale = max((e.double().abs().max().item() for e in expected if e.numel()), default=0.0)
    return diff, OUTPUT_ATOL + OUTPUT_RTOL * scale


def _aoti(program: torch.export.ExportedProgram, model: nn.Module, directory: Path) -> tuple[Any, int]:
    """Compiles ``program`` with AOTInductor into ``directory``: the copies of the shared weights, the size."""
    import torch._inductor

    package = torch._inductor.aoti_compile_and_package(program, package_path=str(directory / "model-aoti.pt2"))
    return archive_copies(model, package), os.path.getsize(package)


def check_export(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    dynamic_batch: bool = True,
    aoti: bool = False,
) -> ExportCheck:
    """Exports ``model`` with ``torch.export`` and checks that the program and its ``.pt2`` package keep the sharing.

    Each shared weight must be stored once in the ``ExportedProgram``, in the program loaded back from the
    package written by ``torch.export.save``, and among the bytes of the package's archive; the loaded
    program's outputs must match the model's in eval mode. The model is exported in eval mode (each
    module's mode is restored afterwards).

    Args:
        model: The sharified model (wrappers are looked through).
        example_inputs: Inputs to export with; ``None``: random inputs of the shapes :func:`sharify.sharify`'s
            analysis used.
        path: Where to write the ``.pt2`` package (atomically, and only when the check passes); ``None``: a
            temporary file.
        dynamic_batch: Whether the program accepts any batch size (dimension 0 of every input).
        aoti: Whether to compile the program with AOTInductor too and check its package (slow: a C++ build).

    Returns:
        What was found (``problems()`` is empty).

    Raises:
        ExportError: A shared weight is stored more than once (its copies are named), or outputs differ.
        ExampleInputsError: ``example_inputs`` is ``None`` and the model records no input shapes.
        OSError: ``path`` cannot be written.

    Example:
        >>> import torchvision, sharify
        >>> from sharify.deploy.export import check_export
        >>> shared = sharify.sharify(torchvision.models.resnet18())
        >>> check = check_export(shared)
        >>> {c.count for c in check.archive}, round(check.package_bytes / 1e6, 1)
        ({1}, 35.1)
    """
    bare = bare_model(model, "check_export")
    inputs = example_inputs_of(bare, example_inputs, "check_export")
    program = export_program(bare, inputs, dynamic_batch)
    expected = reference_outputs(bare, inputs)
    result: dict[str, Any] = {"program": shared_constants(program, bare)}

    with tempfile.TemporaryDirectory(prefix="sharify-export-") as scratch:

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.export.save(program, f)
            with open(tmp, "rb") as f:  # a buffer: the temporary file's name does not end in .pt2
                loaded = torch.export.load(f)
            with torch.no_grad():
                diff, tol = _difference(expected, loaded.module()(*inputs))
            result.update(package=shared_constants(loaded, bare), archive=archive_copies(bare, tmp),
                          package_bytes=os.path.getsize(tmp), max_abs_diff=diff, tolerance=tol)  # fmt: skip
            if aoti:
                result["aoti"], result["aoti_bytes"] = _aoti(program, bare, Path(scratch))
            problems = ExportCheck(**result).problems()
            if problems:
                raise ExportError("; ".join(problems))

        atomic_write(Path(path) if path is not None else Path(scratch) / "model.pt2", write)
    return dataclasses.replace(ExportCheck(**result), path=None if path is None else str(path))
