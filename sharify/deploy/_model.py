"""What the exporters need from the model: the bare module, example inputs, eval mode and reference outputs."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx.experimental._config
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .._wrappers import unwrap
from ..analysis.shapes import as_inputs
from ..analysis.tracing import eval_mode
from ..errors import ExampleInputsError, UnsupportedModelError
from ..layers import shared_stores

__all__ = [
    "bare_model",
    "batch_dynamic_shapes",
    "elements",
    "eval_mode",
    "example_inputs_of",
    "export_program",
    "reference_outputs",
    "stores_values",
]


def bare_model(model: object, caller: str) -> nn.Module:
    """``model`` without its DDP / DataParallel / ``torch.compile`` wrappers (an exporter traces the bare model).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        UnsupportedModelError: ``model`` is a TorchScript module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{caller} cannot export a TorchScript module ({type(model).__name__}); pass the nn.Module it was "
            "scripted from"
        )
    return unwrap(model)[0]


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def example_inputs_of(model: nn.Module, example_inputs: object, caller: str) -> tuple[Tensor, ...]:
    """``example_inputs`` as a tuple on the model's device; ``None``: random tensors of the shapes the analysis
    of :func:`sharify.sharify` used (recorded in ``model.sharify_shared.analysis``), drawn with seed 0.

    Raises:
        TypeError, ValueError: ``example_inputs`` is not a tensor or a non-empty tuple/list of tensors.
        ExampleInputsError: ``None`` and the model records no input shapes (not sharified at its root).
    """
    inputs = as_inputs(example_inputs)
    device = _device(model)
    if inputs is not None:
        return tuple(x.to(device) for x in inputs)
    store = shared_stores(model).get("")
    shapes = store.analysis.get("input_shapes") if store is not None else None
    if not shapes:
        where = "it is not sharified at its root" if store is None else "its analysis recorded no input shapes"
        raise ExampleInputsError(
            f"{caller} needs example inputs for {type(model).__name__} ({where}); pass example_inputs, "
            "e.g. torch.randn(1, 3, 224, 224)"
        )
    dtypes = store.analysis.get("input_dtypes") or ["float32"] * len(shapes)  # type: ignore[union-attr]
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, name in zip(shapes, dtypes):
        dtype = getattr(torch, name)
        random = dtype.is_floating_point
        x = torch.randn(shape, generator=gen, dtype=dtype) if random else torch.zeros(shape, dtype=dtype)
        out.append(x.to(device))
    return tuple(out)


def batch_dynamic_shapes(inputs: tuple[Tensor, ...]) -> tuple[dict[int, Any] | None, ...]:
    """``dynamic_shapes`` for ``torch.export`` that make dimension 0 of every input one dynamic batch size."""
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if x.dim() else None for x in inputs)


def export_program(model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode; with ``dynamic_batch`` any batch size, also when the
    example's is 1 (sizes 0 and 1 are not specialised, as torch's ONNX exporter does too)."""
    shapes = batch_dynamic_shapes(inputs) if dynamic_batch else None
    with eval_mode(model), torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        return torch.export.export(model, inputs, dynamic_shapes=shapes)


def reference_outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The tensors ``model`` returns in eval mode, in the order exporters flatten them (pytree leaves)."""
    with eval_mode(model), torch.no_grad():
        out = model(*inputs)
    return [x.detach().cpu() for x in pytree.tree_leaves(out) if isinstance(x, Tensor)]


def stores_values(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds weights or statistics (floating point, or int8/uint8 as quantised weights), as opposed
    to counters and shapes (other integers)."""
    return tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8)


def elements(model: nn.Module) -> tuple[int, int]:
    """Elements of ``model``'s parameters (each tensor once: the report's ``params_after`` of a sharified model) and
    of its buffers of values (BatchNorm statistics, int8 weights of :func:`sharify.deploy.quantize_int8`), which an
    exporter may also store."""
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers() if stores_values(b))
    return params, buffers
