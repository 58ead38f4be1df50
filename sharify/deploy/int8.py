"""Weight-only int8 that stores each shared tensor once: :func:`quantize_int8`.

Every conv and Linear weight becomes an int8 tensor with one float scale per output channel (symmetric,
``scale = max|W[c]| / 127``, values in ``[-127, 127]``), dequantised in the forward
(``weight = weight_int8 * weight_scale``); activations and biases stay float. A shared weight is quantised
once, in its holder (:class:`Int8SharedConvParams`): the holder owns ``weight_int8`` and ``weight_scale``
and its ``weight`` is the dequantised tensor, which every member reads as it read the float one, so the
``state_dict`` (and a safetensors file) holds one int8 tensor per shared weight. Unshared convs and Linears
get the same treatment in place (their class becomes ``Int8<Class>``, whose own forward runs unchanged).
The forward is ordinary tensor code (a cast and a multiply per weight), so ``torch.compile`` and
``torch.export`` trace it: the exported program has one int8 constant per shared tensor and a dequantising
cast-and-multiply where each member reads it. For ONNX, :func:`qdq_dequantize` makes the same forward
dequantise through torch's ``quantized_decomposed.dequantize_per_channel`` (bitwise the same values), which
torch's ONNX exporter writes as ``DequantizeLinear`` (per-output-channel scale, ``axis=0``, no zero point)
on the int8 initializer: the QDQ form ONNX Runtime and other runtimes recognise, each shared tensor one int8
initializer whose dequantised value every member's Conv reads (the exporter's common-subexpression pass merges
the members' identical ``DequantizeLinear`` nodes into one; :func:`sharify.export_onnx` does this for any model
holding int8 weights). It is not the forward outside exports because Inductor's lowering of that op
needs a zero-point tensor.

Why not torchao (checked with torchao 0.18.0): ``quantize_(model, Int8WeightOnlyConfig())`` swaps each
module's ``weight`` parameter for an ``Int8Tensor``, by default only in ``nn.Linear``. It works per module,
so a tensor read by several modules is quantised once per module (two Linears tied to one weight end up
with two int8 copies). Pointed at the holders with ``filter_fn`` it does quantise each shared weight once,
but ``Int8Tensor`` implements no ``aten.convolution``, so the first member conv's forward raises
``NotImplementedError``; the same holds for plain convs. Nothing here depends on torchao.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..layers import SharedConvParams, is_shared_conv
from ._checks import check_model_and_flag

__all__ = [
    "Int8SharedConvParams",
    "Int8WeightMixin",
    "dequantize",
    "holds_int8",
    "int8_class",
    "qdq_dequantize",
    "quantize_int8",
    "quantize_weight",
]

ModelT = TypeVar("ModelT", bound=nn.Module)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``(q, scale)`` with ``weight ~ q * scale`` along dim 0.

    Each element is off by at most half its channel's scale (``max|W[c]| / 254``); all-zero channels get a
    tiny positive scale and zeros.

    Args:
        weight: A float weight, output channels (rows) along dim 0.

    Returns:
        The int8 tensor of ``weight``'s shape and the scales (one per row, in ``weight``'s dtype).
    """
    w = weight.detach().float()
    scale = (w.abs().flatten(1).amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


_QDQ = False  # set by qdq_dequantize: dequantise through quantized_decomposed.dequantize_per_channel


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` along dim 0, in ``scale``'s dtype (within :func:`qdq_dequantize`: as torch's
    ``quantized_decomposed.dequantize_per_channel``, the same values)."""
    if _QDQ:
        out_dtype = None if scale.dtype == torch.float32 else scale.dtype  # None: the op's float32, no extra Cast
        op = torch.ops.quantized_decomposed.dequantize_per_channel
        return op(q, scale, None, 0, -127, 127, torch.int8, out_dtype=out_dtype)
    return q.to(scale.dtype) * scale.view(-1, *([1] * (q.dim() - 1)))


@contextlib.contextmanager
def qdq_dequantize() -> Iterator[None]:
    """Within the block, int8 weights dequantise through ``torch.ops.quantized_decomposed.dequantize_per_channel``
    (symmetric, per output channel, no zero point), which torch's ONNX exporter writes as ``DequantizeLinear``.

    The values are bitwise those of the plain forward (``q * scale`` rounded once in the scale's dtype).
    :func:`sharify.export_onnx` exports within it; it is for tracing (ONNX), not for ``torch.compile``, whose
    Inductor lowering of the op requires a zero-point tensor.

    Example:
        >>> import torch
        >>> from sharify.deploy.int8 import qdq_dequantize, quantize_int8
        >>> q = quantize_int8(torch.nn.Linear(4, 2))
        >>> with qdq_dequantize():
        ...     program = torch.export.export(q, (torch.randn(1, 4),))
        >>> any("dequantize_per_channel" in str(n.target) for n in program.graph.nodes)
        True
    """
    global _QDQ
    importlib.import_module("torch.ao.quantization.fx._decomposed")  # registers the quantized_decomposed ops
    previous, _QDQ = _QDQ, True
    try:
        yield
    finally:
        _QDQ = previous


def holds_int8(model: nn.Module) -> bool:
    """Whether ``model`` has a weight :func:`quantize_int8` stored as int8."""
    return any(isinstance(m, Int8WeightMixin) for m in model.modules())


class Int8WeightMixin:
    """Makes a module's ``weight`` the dequantised value of its ``weight_int8`` and ``weight_scale`` buffers.

    Assigning ``module.weight = ...`` makes it a float module again (its original class) with that weight.
    """

    _int8_base: type[nn.Module]

    @property
    def weight(self) -> Tensor:
        buffers = self._buffers  # type: ignore[attr-defined]
        return dequantize(buffers["weight_int8"], buffers["weight_scale"])

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight" and "weight_int8" in self.__dict__.get("_buffers", {}):
            del self._buffers["weight_int8"], self._buffers["weight_scale"]  # type: ignore[attr-defined]
            self.__class__ = self._int8_base  # type: ignore[assignment]
            setattr(self, name, value)  # now dispatched to the float class
            return
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 weight"  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Classes made at run time cannot be pickled by name: rebuild from the (importable) float class.
        return _new_int8_instance, (self._int8_base,), self.__getstate__()


class Int8SharedConvParams(Int8WeightMixin, SharedConvParams):  # type: ignore[misc]  # weight becomes a view
    """A holder whose shared weight is stored as int8 (``weight_int8``, ``weight_scale``); members read it
    dequantised through ``weight``."""

    _int8_base = SharedConvParams


_INT8_CLASSES: dict[type[nn.Module], type[nn.Module]] = {SharedConvParams: Int8SharedConvParams}


def int8_class(base: type[nn.Module]) -> type[nn.Module]:
    """``Int8<base>``: the class of a ``base`` module whose weight :func:`quantize_int8` stored as int8."""
    if issubclass(base, Int8WeightMixin):
        return base
    cls = _INT8_CLASSES.get(base)
    if cls is None:
        name = f"Int8{base.__name__}"
        cls = type(name, (Int8WeightMixin, base), {"_int8_base": base, "__module__": __name__, "__qualname__": name})
        _INT8_CLASSES[base] = cls
    return cls


def _new_int8_instance(base: type[nn.Module]) -> nn.Module:
    cls = int8_class(base)
    return cls.__new__(cls)


def _quantizable(module: nn.Module) -> bool:
    """A holder, or a conv / Linear with a float weight of its own (members read their holder's)."""
    if isinstance(module, Int8WeightMixin) or is_shared_conv(module):
        return False
    if not isinstance(module, (SharedConvParams, nn.modules.conv._ConvNd, nn.Linear)):
        return False
    weight = module._parameters.get("weight")
    return (
        isinstance(weight, nn.Parameter)
        and not isinstance(weight, nn.parameter.UninitializedParameter)
        and weight.is_floating_point()
        and weight.dim() >= 2
    )


def quantize_int8(model: ModelT, *, inplace: bool = False) -> ModelT:
    """Weight-only int8 with per-output-channel scales, each shared tensor quantised once.

    Every holder of a shared weight (:class:`~sharify.SharedConvParams`) and every unshared conv and Linear
    stores its weight as ``weight_int8`` (int8) and ``weight_scale`` (one float per output channel; per row of
    the weight, which for a transposed conv is its input channel) and dequantises it in the forward. Biases,
    BatchNorms, ``shared_gain`` and folded scales stay float; so does the model's mode. A weight tied between
    modules is quantised once too. Apply :func:`sharify.fold_batchnorm` first for a folded int8 model.

    Args:
        model: The model (sharified or not), not a DDP / DataParallel / ``torch.compile`` wrapper.
        inplace: Quantise ``model`` itself instead of a deep copy.

    Returns:
        The quantised model (``model`` itself with ``inplace=True``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``inplace`` not a bool.
        UnsupportedModelError: A TorchScript module or a wrapper: quantise the bare model, then wrap the result.

    Example:
        >>> import torchvision, sharify
        >>> q = sharify.quantize_int8(sharify.sharify(torchvision.models.resnet18()))
        >>> sd = q.state_dict()
        >>> sd["sharify_shared.layer1.conv2.weight_int8"].dtype, "layer1.0.conv2.weight_int8" in sd
        (torch.int8, False)
    """
    check_model_and_flag(model, inplace, "quantize_int8")
    target = model if inplace else copy.deepcopy(model)
    done: dict[int, tuple[Tensor, Tensor]] = {}  # by id of the float weight: a tie is quantised once
    for module in list(target.modules()):
        if not _quantizable(module):
            continue
        weight = module._parameters.pop("weight")
        assert weight is not None  # _quantizable checked it
        if id(weight) not in done:
            with torch.no_grad():
                done[id(weight)] = quantize_weight(weight)
        q, scale = done[id(weight)]
        module.__class__ = int8_class(type(module))
        module.register_buffer("weight_int8", q)
        module.register_buffer("weight_scale", scale)
    return target
