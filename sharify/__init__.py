"""sharify: make existing PyTorch CNNs smaller by sharing weights between residual blocks.

One call turns a trained ResNet-like network into one where the convs of each residual stage share
one weight tensor::

    import timm, sharify
    model = timm.create_model("resnet50", pretrained=True)
    shared = sharify.sharify(model)        # torch.fx finds the stages; convs share weights
    print(sharify.report(model, shared))   # parameters before/after, per stage and group

The stages are found by tracing the model with torch.fx (:mod:`sharify.analysis.residual`), so torchvision,
timm and hand-written networks work alike; the result keeps its class and plugs into ordinary
training code.

Papers:
    * A. Boulch. *ShaResNet: reducing residual network parameter number by sharing weights.*
      arXiv:1702.08782; Pattern Recognition Letters, 2018.
    * W. Kang, D. Kim et al. *Deeply Shared Filter Bases for Parameter-Efficient Convolutional
      Neural Networks.* (NeurIPS 2021 submission; code: Net_RL2).
"""

from ._version import __version__
from .deploy import export_onnx, fold_batchnorm, quantize_int8
from .errors import (
    AlreadySharifiedError,
    CheckpointError,
    ExampleInputsError,
    ExportError,
    NothingToShareError,
    PretrainedWeightsError,
    RecipeMismatchError,
    SharifyError,
    TieError,
    UnsupportedModelError,
    UntraceableError,
)
from .io.recipe import GroupRecipe, Recipe
from .io.serialization import load, read_recipe, save
from .io.unshared import load_unshared_state_dict
from .io.zoo import ModelSource
from .layers import SharedConv2d, SharedConvParams, cached_weights, is_shared_conv, shared_groups
from .planning.options import PRESETS, SharingOptions
from .planning.plan import ConvSignature, SharingGroup, SharingPlan, plan
from .report import GroupReport, ParameterReport, report
from .rewrite.apply import apply_plan, sharify, unshare
from .rewrite.basis import BasisConv2d, orthogonality_loss
from .rewrite.verify import retie, verify

__all__ = [
    "PRESETS",
    "AlreadySharifiedError",
    "BasisConv2d",
    "CheckpointError",
    "ConvSignature",
    "ExampleInputsError",
    "ExportError",
    "GroupRecipe",
    "GroupReport",
    "ModelSource",
    "NothingToShareError",
    "ParameterReport",
    "PretrainedWeightsError",
    "Recipe",
    "RecipeMismatchError",
    "SharedConv2d",
    "SharedConvParams",
    "SharifyError",
    "SharingGroup",
    "SharingOptions",
    "SharingPlan",
    "TieError",
    "UnsupportedModelError",
    "UntraceableError",
    "__version__",
    "apply_plan",
    "cached_weights",
    "export_onnx",
    "fold_batchnorm",
    "is_shared_conv",
    "load",
    "load_unshared_state_dict",
    "orthogonality_loss",
    "plan",
    "quantize_int8",
    "read_recipe",
    "report",
    "retie",
    "save",
    "shared_groups",
    "sharify",
    "unshare",
    "verify",
]
