"""Deployment: inference models that keep the sharing.

Reads a model (sharified or not; :func:`sharify.sharify`'s output keeps its members and holders) and produces
inference models in which every shared tensor is still stored once: :func:`fold_batchnorm`
(:mod:`~sharify.deploy.batchnorm`) folds each conv's following BatchNorm, into the weight of an unshared conv
as torch's fusion does and into a per-member, per-output-channel scale and bias after a shared conv, so
that folding no longer re-materialises one weight per member; :func:`quantize_int8`
(:mod:`~sharify.deploy.int8`) stores every conv and Linear weight as int8 with per-output-channel scales,
each shared tensor quantised once in its holder and dequantised by every member in its forward.
"""

from .batchnorm import fold_batchnorm
from .int8 import quantize_int8

__all__ = ["fold_batchnorm", "quantize_int8"]
