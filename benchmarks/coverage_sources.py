"""The model sources of the coverage sweep: which models each one lists, how each model is built, its family.

A *source* is a set of builders: ``torchvision`` (classification) and ``timm`` (every ``timm.list_models()``
name), torchvision's ``torchvision-detection``, ``torchvision-segmentation``, ``torchvision-video`` and
``torchvision-optical-flow`` builders (``weights=None``, ``weights_backbone=None``, detectors at a small
``min_size``/``max_size``), and ``transformers``: the model types of
``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``, each built with its config class's defaults by
``AutoModelForImageClassification.from_config`` (listed only when ``transformers`` is installed).
Every model is built with random init; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import torch
from torch import Tensor, nn

from sharify.io.zoo import ModelSource, build_model

__all__ = [
    "PREFIXES",
    "SOURCES",
    "MissingPackageError",
    "build",
    "detection_targets",
    "family_of",
    "library_of",
    "source_models",
]

#: Every source, in the order of the sweep and of the summary.
SOURCES = (
    "torchvision",
    "timm",
    "torchvision-detection",
    "torchvision-segmentation",
    "torchvision-video",
    "torchvision-optical-flow",
    "transformers",
)

#: Short prefixes for ``--filter`` globs (``tv:resnet*``, ``hf:*``); the source's own name works too.
PREFIXES = {
    "torchvision": "tv",
    "timm": "timm",
    "torchvision-detection": "tv-detection",
    "torchvision-segmentation": "tv-segmentation",
    "torchvision-video": "tv-video",
    "torchvision-optical-flow": "tv-optical-flow",
    "transformers": "hf",
}

# The torchvision.models submodule of each torchvision source ("" for classification).
_TV_MODULES = {
    "torchvision": "",
    "torchvision-detection": "detection",
    "torchvision-segmentation": "segmentation",
    "torchvision-video": "video",
    "torchvision-optical-flow": "optical_flow",
}

# Detector input size of the sweep: GeneralizedRCNNTransform resizes every image to this (RCNN, RetinaNet,
# FCOS); SSD builders fix their own size and take no min_size/max_size.
DETECTION_PX = 128


class MissingPackageError(ImportError):
    """A model needs a package that is not installed (recorded as ``skipped``, not as an error)."""


def library_of(source: str) -> str:
    """The library behind ``source``: ``torchvision``, ``timm`` or ``transformers``."""
    if source not in SOURCES:
        raise ValueError(f"unknown coverage source {source!r}; choose from {', '.join(SOURCES)}")
    return source.split("-")[0]


def source_models(source: str) -> list[str]:
    """Every model name of ``source`` (``[]`` for ``transformers`` when it is not installed)."""
    library = library_of(source)
    if library == "timm":
        import timm

        return list(timm.list_models())
    if library == "transformers":
        if importlib.util.find_spec("transformers") is None:
            return []
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

        return list(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    import torchvision

    module = _TV_MODULES[source]
    return list(
        torchvision.models.list_models(module=getattr(torchvision.models, module) if module else torchvision.models)
    )


def family_of(source: str, name: str) -> str:
    """Model family: the module that defines the builder (``timm.resnet``, ``torchvision.regnet``,
    ``torchvision.detection.faster_rcnn``), or ``transformers.<model type>``."""
    library = library_of(source)
    if library == "timm":
        from timm.models import model_entrypoint

        return "timm." + model_entrypoint(name).__module__.removeprefix("timm.models.")
    if library == "transformers":
        return f"transformers.{name}"
    import torchvision

    return "torchvision." + torchvision.models.get_model_builder(name).__module__.removeprefix("torchvision.models.")


def builder_kwargs(source: str, name: str) -> dict[str, Any]:
    """Builder arguments besides ``weights=None``: no backbone weights, small detector inputs."""
    kwargs: dict[str, Any] = {}
    if source in ("torchvision-detection", "torchvision-segmentation"):
        kwargs["weights_backbone"] = None
    if source == "torchvision-detection" and not name.startswith("ssd"):
        kwargs.update(min_size=DETECTION_PX, max_size=DETECTION_PX)
    return kwargs


def build(source: str, name: str) -> nn.Module:
    """Builds model ``name`` of ``source`` with random init on the current default device.

    Raises:
        MissingPackageError: The model needs a package that is not installed.
    """
    library = library_of(source)
    if library != "transformers":
        return build_model(ModelSource(library, name, builder_kwargs(source, name)))[0]
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        config = AutoConfig.for_model(name)
        if config.architectures is None:  # transformers' _get_model_class iterates it to choose among several
            config.architectures = []  # classes (deit, levit, perceiver); [] gives the first, the default
        return AutoModelForImageClassification.from_config(config)
    except ImportError as exc:  # transformers' requires_backends: "... requires the X library ..."
        first = re.split(r"(?<=\.)\s", str(exc).strip() or type(exc).__name__)[0]  # "X requires the Y library ..."
        raise MissingPackageError(f"needs a package that is not installed: {first}") from exc


def detection_targets(images: list[Tensor], model: nn.Module) -> list[dict[str, Tensor]]:
    """One box per image (with a mask or keypoints when the detector predicts them), for a training forward."""
    targets = []
    for image in images:
        height, width = image.shape[-2:]
        target = {"boxes": torch.tensor([[4.0, 4.0, width / 2, height / 2]]), "labels": torch.tensor([1])}
        roi_heads = getattr(model, "roi_heads", None)
        if getattr(roi_heads, "mask_head", None) is not None:
            masks = torch.zeros(1, height, width, dtype=torch.uint8)
            masks[:, 4 : height // 2, 4 : width // 2] = 1
            target["masks"] = masks
        if getattr(roi_heads, "keypoint_head", None) is not None:
            points = roi_heads.keypoint_predictor.kps_score_lowres.out_channels  # type: ignore[union-attr]
            xy = torch.rand(1, points, 2) * torch.tensor([width / 2 - 4, height / 2 - 4]) + 4
            target["keypoints"] = torch.cat([xy, torch.ones(1, points, 1)], dim=-1)
        targets.append(target)
    return targets
