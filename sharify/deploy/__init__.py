"""Deployment: exported files that keep the sharing, and checks that they do.

Reads a sharified model (and example inputs, by default the shapes its analysis used) and produces files
for inference engines in which each shared tensor is stored once: :func:`export_onnx` writes an ONNX file
through torch's ``torch.export``-based exporter (the legacy TorchScript exporter folds each BatchNorm into
every member and stores one copy per member) and :func:`check_onnx` checks one: every shared weight found
once among its initializers, exact or scaled per output channel (:mod:`~sharify.deploy.onnx`), its size
against :func:`sharify.report`'s parameter count, its outputs in ONNX Runtime against PyTorch's.
:func:`check_export` does the same for ``torch.export``: the ``ExportedProgram``, its ``.pt2`` package and,
on request, an AOTInductor package (:mod:`~sharify.deploy.export`). Needs ``pip install 'sharify[onnx]'``
for ONNX.
"""

from .export import ExportCheck, check_export, shared_constants
from .onnx import OnnxCheck, check_onnx, export_onnx

__all__ = ["ExportCheck", "OnnxCheck", "check_export", "check_onnx", "export_onnx", "shared_constants"]
