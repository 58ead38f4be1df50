"""ONNX files that keep the sharing: :func:`export_onnx` writes one, :func:`check_onnx` checks one.

torch has two ONNX exporters, and only one keeps a sharified model small. The exporter built on
``torch.export`` (``torch.onnx.export(..., dynamo=True)``, torch's default since 2.9) stores every parameter
once, as one initializer that all member convs read: the file of a shared ResNet-18 is 34.3 MB against the
original's 46.8 MB, and ONNX Runtime runs it at the original's speed. The legacy TorchScript exporter
(``dynamo=False``) folds each BatchNorm into the conv before it, so each member gets its own folded copy
of the shared weight and the file is as large as the original's. With a BatchNorm's default statistics
the folded copies are equal and get merged, which hides the loss: the tests randomise the statistics.

:func:`export_onnx` exports through the ``torch.export`` exporter, checks the file and only then puts it in
place (all or nothing, :func:`sharify.io.atomic.atomic_write`). The check (:func:`check_onnx`) finds every
copy of each shared weight among the file's initializers and constants, exact or scaled per output channel
(:mod:`sharify.deploy._copies`); counts the stored elements against the model's parameters (the
``params_after`` of :func:`sharify.report`) and buffers; and runs the file in ONNX Runtime, when it is
installed, against the PyTorch model in eval mode.

Needs ``onnx`` and ``onnxscript`` (``onnxruntime`` for the output check): ``pip install 'sharify[onnx]'``.
A model quantised by :func:`sharify.quantize_int8` is exported in ONNX's QDQ form: its int8 weights stay
int8 initializers, each dequantised by ``DequantizeLinear`` where it is read (:func:`export_onnx`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ExampleInputsError, ExportError
from ..io.atomic import atomic_write
from ._copies import TensorCopies, copies_message, find_copies
from ._model import (
    bare_model,
    batch_dynamic_shapes,
    elements,
    eval_mode,
    example_inputs_of,
    reference_outputs,
    stores_values,
)
from .int8 import holds_int8, qdq_dequantize

__all__ = ["OUTPUT_ATOL", "OUTPUT_RTOL", "OnnxCheck", "check_onnx", "export_onnx", "stored_tensors"]

#: ONNX Runtime's outputs may differ from PyTorch's by ``OUTPUT_ATOL + OUTPUT_RTOL * max|output|`` (float32).
#: The exporter folds the BatchNorms of unshared convs into their weights and ONNX Runtime's kernels sum in
#: another order, so the two differ by float32 rounding accumulated over the network: 5e-7 to 6e-7 of the
#: largest output on the benchmark's five networks (``benchmarks/results/deploy.md``). 1e-4 leaves a
#: hundredfold margin, while a wrong or missing tensor changes outputs by a large fraction of their size.
OUTPUT_RTOL = 1e-4
#: The absolute part of the output tolerance, for outputs that are all near zero.
OUTPUT_ATOL = 1e-5
#: The stored elements may exceed the model's parameters and buffers by this fraction (the exporter's
#: constants: shapes, folded biases) before the check calls the file too large.
ELEMENTS_SLACK = 0.02

_FIX = (
    "export with sharify.export_onnx (torch.onnx.export(..., dynamo=True), the exporter built on torch.export, "
    "stores each shared tensor once), not with the legacy exporter (dynamo=False), which folds each BatchNorm "
    "into every member"
)


@dataclass(frozen=True)
class OnnxCheck:
    """What :func:`check_onnx` found in an ONNX file.

    Attributes:
        file: The file checked.
        tensors: Where each shared weight is stored (exactly one copy each when the sharing is kept).
        stored_elements: Elements of the file's floating-point (and int8/uint8) initializers and constants.
        params: The model's parameters, each tensor once (:func:`sharify.report`'s ``params_after``).
        buffers: Elements of the model's floating-point (and int8/uint8) buffers: BatchNorm statistics, int8 weights.
        max_abs_diff: Largest difference between ONNX Runtime's and PyTorch's outputs (``None``: not run).
        tolerance: The difference allowed (``None``: not run).
        int8_elements: Elements of the file's int8 initializers and constants.
        int8_buffers: Elements of the model's int8 buffers (the weights :func:`sharify.quantize_int8` stored as
            int8, each tensor once), which the file must store as int8, each once.
    """

    file: str
    tensors: tuple[TensorCopies, ...]
    stored_elements: int
    params: int
    buffers: int
    max_abs_diff: float | None = None
    tolerance: float | None = None
    int8_elements: int = 0
    int8_buffers: int = 0

    def problems(self) -> list[str]:
        """What is wrong with the file, each with what to do (empty: the check passed)."""
        out = []
        copies = copies_message(self.tensors, f"the ONNX file {self.file}", _FIX)
        if copies:
            out.append(copies)
        limit = (self.params + self.buffers) * (1 + ELEMENTS_SLACK)
        if self.stored_elements > limit and not copies:  # (duplicated shared tensors say it already)
            out.append(
                f"the ONNX file {self.file} stores {self.stored_elements:,} elements, more than the model's "
                f"{self.params:,} parameters (sharify.report's params_after) and {self.buffers:,} buffer elements "
                f"allow (+{ELEMENTS_SLACK:.0%}): tensors are stored more than once; {_FIX}"
            )
        if self.int8_elements != self.int8_buffers and not copies:
            how = (
                "dequantised into floating-point constants" if self.int8_elements < self.int8_buffers else "duplicated"
            )
            out.append(
                f"the ONNX file {self.file} stores {self.int8_elements:,} int8 elements, the model's int8 weights "
                f"{self.int8_buffers:,}: int8 weights were {how}; export with sharify.export_onnx, which writes each "
                "int8 weight once as an initializer that DequantizeLinear reads"
            )
        if self.max_abs_diff is not None and self.tolerance is not None and not self.max_abs_diff <= self.tolerance:
            out.append(
                f"ONNX Runtime's outputs of {self.file} differ from the PyTorch model's (eval mode) by up to "
                f"{self.max_abs_diff:.3g} (allowed: {self.tolerance:.3g}); export in eval mode with the inputs the "
                "model is used with, and report the model if it persists"
            )
        return out


def _import(name: str, caller: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{caller} needs the `{name.split('.')[0]}` package: pip install 'sharify[onnx]'") from exc


def _to_torch(array: Any) -> Tensor | None:
    """A numpy array from ONNX as a tensor (``None`` for a dtype torch lacks, e.g. strings)."""
    import numpy as np

    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(np.array(array))  # a writable copy
    except TypeError:
        return None


def stored_tensors(proto: Any) -> dict[str, Tensor]:
    """Every tensor an ONNX model stores: the initializers and ``Constant`` values of its graphs and functions.

    Args:
        proto: An ``onnx.ModelProto`` (with its external data loaded).
    """
    onnx = _import("onnx", "check_onnx")
    out: dict[str, Tensor] = {}
    graphs = [proto.graph]
    nodes = [n for f in proto.functions for n in f.node]
    while graphs:
        graph = graphs.pop()
        for init in graph.initializer:
            out[init.name] = init
        nodes += list(graph.node)
        while nodes:
            node = nodes.pop()
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = attr.t
                graphs += [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    arrays = {name: _to_torch(onnx.numpy_helper.to_array(t)) for name, t in out.items()}
    return {name: t for name, t in arrays.items() if t is not None}


def _stored_elements(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() for t in tensors.values() if stores_values(t))


def _run_onnxruntime(file: Path, inputs: tuple[Tensor, ...]) -> list[Any] | None:
    """The file's outputs in ONNX Runtime on the CPU (``None``: ONNX Runtime is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ExportError(
            f"the ONNX file {file} takes {len(names)} inputs ({', '.join(names)}) but {len(inputs)} example inputs "
            "were given; pass the example inputs the model was exported with"
        )
    return list(session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}))


def _output_difference(expected: list[Tensor], got: list[Any], file: str) -> tuple[float, float]:
    """The largest difference between the outputs, and the tolerance (of the output with the least margin)."""
    if len(expected) != len(got):
        raise ExportError(
            f"the ONNX file {file} returns {len(got)} outputs, the PyTorch model {len(expected)}; "
            "export the model whose outputs are compared"
        )
    worst, worst_tol, margin = 0.0, OUTPUT_ATOL, float("inf")
    for ref, out in zip(expected, got):
        out_t = torch.as_tensor(out)
        if out_t.shape != ref.shape:
            raise ExportError(
                f"an output of the ONNX file {file} has shape {tuple(out_t.shape)}, the PyTorch model's "
                f"{tuple(ref.shape)}; export with the inputs the model is used with"
            )
        ref64, out64 = ref.double(), out_t.double()
        diff = (out64 - ref64).abs().max().item() if ref.numel() else 0.0
        tol = OUTPUT_ATOL + OUTPUT_RTOL * (ref64.abs().max().item() if ref.numel() else 0.0)
        if tol - diff < margin or diff != diff:
            worst, worst_tol, margin = diff, tol, tol - diff
    return worst, worst_tol


def _check(model: nn.Module, file: Path, inputs: tuple[Tensor, ...] | None, label: str) -> OnnxCheck:
    onnx = _import("onnx", "check_onnx")
    tensors = stored_tensors(onnx.load(str(file)))
    params, buffers = elements(model)
    int8 = sum(t.numel() for t in tensors.values() if t.dtype == torch.int8)
    int8_buffers = sum(b.numel() for b in model.buffers() if b.dtype == torch.int8)
    check = OnnxCheck(label, find_copies(model, tensors), _stored_elements(tensors), params, buffers,
                      int8_elements=int8, int8_buffers=int8_buffers)  # fmt: skip
    if inputs is not None:
        got = _run_onnxruntime(file, inputs)
        if got is not None:
            diff, tol = _output_difference(reference_outputs(model, inputs), got, label)
            check = dataclasses.replace(check, max_abs_diff=diff, tolerance=tol)
    problems = check.problems()
    if problems:
        raise ExportError("; ".join(problems))
    return check


def check_onnx(
    model: nn.Module,
    file: str | os.PathLike[str],
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    *,
    run: bool = True,
) -> OnnxCheck:
    """Checks that the ONNX ``file`` exported from the sharified ``model`` keeps the sharing.

    Each shared weight must be stored exactly once (an exact copy, or one scaled per output channel where a
    single BatchNorm was folded in); the file's floating-point elements must not exceed the model's parameters
    and buffers by more than 2 %; with ``run`` and ONNX Runtime installed, the file's outputs on
    ``example_inputs`` must match the model's in eval mode within ``OUTPUT_ATOL + OUTPUT_RTOL * max|output|``.
    For a model quantised by :func:`sharify.quantize_int8`, each shared weight is its int8 tensor, which must be
    stored once and as int8 (not as a dequantised float constant), and the file's int8 elements must equal the
    model's int8 weights (every weight once, shared or not).

    Args:
        model: The sharified model the file was exported from (its mode is restored afterwards).
        file: The ``.onnx`` file (external data next to it is read too).
        example_inputs: Inputs for the output comparison; ``None``: random inputs of the shapes
            :func:`sharify.sharify`'s analysis used.
        run: Whether to compare outputs in ONNX Runtime (skipped when it is not installed).

    Returns:
        What was found (``problems()`` is empty).

    Raises:
        ExportError: A shared weight is stored more than once (its copies are named), not found or (int8)
            stored as floating point, the file is larger than the model's tensors, its int8 elements are not the
            model's int8 weights, or the outputs differ.
        ExampleInputsError: ``run`` without ``example_inputs`` for a model that records no input shapes.
        ImportError: ``onnx`` is not installed.
    """
    bare = bare_model(model, "check_onnx")
    inputs = example_inputs_of(bare, example_inputs, "check_onnx") if run else None
    return _check(bare, Path(file), inputs, str(file))


def _keep_shared(node: Any) -> bool | None:
    """The constant folding's rule for ``node``: never fold a node that reads an initializer other nodes read too
    (``shared weight * member gain``): its folded output would be one more copy of the shared tensor; never fold a
    ``DequantizeLinear`` (its output is the int8 weight as float, four times the bytes)."""
    if node.op_type == "DequantizeLinear":
        return False
    for value in node.inputs:
        if value is not None and value.is_initializer() and len(value.consumers()) > 1:
            return False
    return None  # the optimizer's own rules


def _check_inputs_fit(model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """``ExampleInputsError`` when ``model`` cannot run on ``inputs`` at all (eval mode, no gradients)."""
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ExampleInputsError(
            f"{type(model).__name__} cannot run on example inputs of shape {shapes} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); pass example_inputs the model accepts"
        ) from exc


def _drop_node_metadata(model: Any) -> None:
    """Clears the ``metadata_props`` of every node of the ONNX IR ``model``: the exporter's debugging records of
    where each node came from (Python stack trace, module class hierarchy, FX node, name scopes), about 1.3 kB a
    node, which ONNX Runtime never reads."""
    for graph in [model.graph, *model.functions.values()]:
        for node in graph.all_nodes():
            node.metadata_props.clear()


def _export(model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool, keep_metadata: bool = False) -> Any:
    optimizer = _import("onnxscript.optimizer", "export_onnx")
    shapes = batch_dynamic_shapes(inputs) if dynamic_batch else None
    qdq = qdq_dequantize() if holds_int8(model) else contextlib.nullcontext()
    try:
        with eval_mode(model), qdq:
            program = torch.onnx.export(
                model, inputs, dynamo=True, dynamic_shapes=shapes, verbose=False, optimize=False
            )
        if program is None:  # only the legacy exporter writes without returning a program
            raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    except Exception as exc:
        _check_inputs_fit(model, inputs)  # a forward that fails on the inputs is the clearer error
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch's exporter colours its messages
        first = text.splitlines()[0] if text else type(exc).__name__
        hint = "; try dynamic_batch=False" if dynamic_batch else ""
        raise ExportError(
            f"torch.onnx.export(..., dynamo=True) cannot export {type(model).__name__}: {first}{hint}; the model "
            "must be exportable with torch.export.export (see the error above)"
        ) from exc
    # torch's own optimisation (program.optimize()), with a folding rule that keeps shared tensors shared
    optimizer.optimize_ir(program.model, should_fold=_keep_shared)
    fusions = getattr(importlib.import_module("onnxscript.rewriter"), "onnx_fusions", None)
    if fusions is not None:
        fusions.fuse(program.model)
    if not keep_metadata:
        _drop_node_metadata(program.model)
    return program


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    keep_metadata: bool = False,
) -> Path:
    """Exports ``model`` to an ONNX file that stores each shared tensor once.

    Exports through torch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``) in eval
    mode (each module's mode is restored afterwards), into one file (no external data: models up to ONNX's
    2 GiB limit). With ``check``, :func:`check_onnx` checks the file before it is put in place: a file that
    fails is not written.

    A model quantised by :func:`sharify.quantize_int8` is written in ONNX's QDQ form: each int8 weight is one
    int8 initializer, dequantised by ``DequantizeLinear`` (one float32 scale per output channel, ``axis=0``, no
    zero point) in front of the Conv or Gemm, a shared one once for all its members; the outputs are the int8
    PyTorch model's. The constant folding never folds a ``DequantizeLinear`` into a float constant.

    Args:
        model: The model, sharified or not, float or int8 (wrappers are looked through).
        path: The ``.onnx`` file to write; its directory must exist.
        example_inputs: Inputs to trace with (a tensor or a tuple); ``None``: random inputs of the shapes
            :func:`sharify.sharify`'s analysis used.
        dynamic_batch: Whether the file accepts any batch size (dimension 0 of every input).
        check: Whether to check the file (see :func:`check_onnx`).
        keep_metadata: Keep the exporter's per-node debugging metadata (the Python stack trace, module class
            hierarchy and FX node each node came from: about 1.3 kB a node, 3 % of the int8 file of a shared
            WRN-40-4); dropped by default, as ONNX Runtime never reads it.

    Returns:
        ``path``.

    Raises:
        ExportError: The exporter failed, or the check did (naming the duplicated tensors).
        ExampleInputsError: ``example_inputs`` is ``None`` and the model records no input shapes.
        ImportError: ``onnx`` or ``onnxscript`` is not installed.
        OSError: The file cannot be written.

    Example:
        >>> import torchvision, sharify
        >>> shared = sharify.sharify(torchvision.models.resnet18())
        >>> path = sharify.export_onnx(shared, "resnet18-shared.onnx")
        >>> round(path.stat().st_size / 1e6, 1)
        34.2
    """
    bare = bare_model(model, "export_onnx")
    inputs = example_inputs_of(bare, example_inputs, "export_onnx")
    path = Path(path)
    program = _export(bare, inputs, dynamic_batch, keep_metadata)

    def write(tmp: Path) -> None:
        program.save(str(tmp), external_data=False)
        if check:
            _check(bare, tmp, inputs, str(path))

    atomic_write(path, write)
    return path
