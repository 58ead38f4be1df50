"""Deployment: inference models and exported files that keep the sharing, and checks that they do.

Reads a model (sharified or not) and produces inference models and files in which every shared tensor is
still stored once. :func:`fold_batchnorm` (:mod:`~sharify.deploy.batchnorm`) folds each conv's following
BatchNorm, into the weight of an unshared conv as torch's fusion does and into a per-member, per-output-channel
scale and bias after a shared conv, so that folding no longer re-materialises one weight per member.
:func:`quantize_int8` (:mod:`~sharify.deploy.int8`) stores every conv and Linear weight as int8 with
per-output-channel scales, each shared tensor quantised once in its holder and dequantised by every member.
:func:`export_onnx` writes an ONNX file through torch's ``torch.export``-based exporter (the legacy
TorchScript exporter folds each BatchNorm into every member and stores one copy per member) and
:func:`check_onnx` checks one: every shared weight found once among its initializers, exact or scaled per
output channel (:mod:`~sharify.deploy.onnx`), its size against :func:`sharify.report`'s parameter count, its
outputs in ONNX Runtime against PyTorch's. :func:`check_export` does the same for ``torch.export``: the
``ExportedProgram``, its ``.pt2`` package and, on request, an AOTInductor package
(:mod:`~sharify.deploy.export`). ONNX needs ``pip install 'sharify[onnx]'``.
"""

from .batchnorm import fold_batchnorm
from .export import ExportCheck, check_export, shared_constants
from .int8 import quantize_int8
from .onnx import OnnxCheck, check_onnx, export_onnx

__all__ = [
    "ExportCheck",
    "OnnxCheck",
    "check_export",
    "check_onnx",
    "export_onnx",
    "fold_batchnorm",
    "quantize_int8",
    "shared_constants",
]
