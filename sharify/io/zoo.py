"""Building torchvision and timm models by name, for the CLI and for recipes.

``"resnet50"`` resolves to torchvision's builder when torchvision has a model of that name (classification,
detection, segmentation, video or optical flow), else to timm's; ``"tv:resnet50"`` and ``"timm:resnet50"``
choose explicitly.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import PretrainedWeightsError

__all__ = ["SOURCE_ATTR", "TORCHVISION_TASKS", "ModelSource", "build_model", "resolve_model_name", "torchvision_names"]

#: Attribute in which :func:`build_model` records a model's :class:`ModelSource` (read by :func:`sharify.save`).
SOURCE_ATTR = "_sharify_source"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``library`` (``"torchvision"`` or ``"timm"``), name and builder kwargs."""

    library: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("library", "name"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                raise TypeError(f"ModelSource.{attr} must be a non-empty str, got {getattr(self, attr)!r}")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise TypeError(f"ModelSource.kwargs must be a dict of builder keyword arguments, got {self.kwargs!r}")


#: torchvision's model modules whose builders :func:`build_model` makes (its quantized models are left out).
TORCHVISION_TASKS = ("classification", "detection", "segmentation", "video", "optical_flow")


def torchvision_names(task: str | None = None) -> list[str]:
    """Names of torchvision's builders of one task in :data:`TORCHVISION_TASKS`, or of all of them."""
    import torchvision

    names: list[str] = []
    for t in (task,) if task else TORCHVISION_TASKS:
        module = torchvision.models if t == "classification" else getattr(torchvision.models, t)
        names += torchvision.models.list_models(module=module)
    return names


def _torchvision_names() -> list[str]:
    return torchvision_names()


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:  # pragma: no cover
        return []
    return list(timm.list_models())


def resolve_model_name(name: str) -> ModelSource:
    """Resolves ``name`` (optionally prefixed ``tv:`` / ``timm:``) to a library and model name.

    Raises:
        ValueError: No such model; the message lists close matches.
    """
    library, _, bare = name.rpartition(":")
    library = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm", "": ""}.get(library, library)
    if library not in ("", "torchvision", "timm"):
        raise ValueError(f"unknown model library {library!r} in {name!r}; use 'tv:NAME' or 'timm:NAME'")
    if library in ("", "torchvision") and bare in _torchvision_names():
        return ModelSource("torchvision", bare)
    if library in ("", "timm"):
        timm_names = _timm_names()
        if bare in timm_names or bare.split(".")[0] in timm_names:
            return ModelSource("timm", bare)
    known = _torchvision_names() + _timm_names()
    close = difflib.get_close_matches(bare, known, n=5)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else "; see torchvision.models.list_models() / timm.list_models()"
    )
    raise ValueError(
        f"unknown model {name!r}: not a torchvision model (classification, detection, segmentation, video, optical "
        f"flow) or a timm model{hint}"
    )


@contextmanager
def _download_errors(source: ModelSource, pretrained: bool) -> Iterator[None]:
    """Turns a failed download of pretrained weights (urllib, Hugging Face Hub: ``OSError``s) into one line."""
    try:
        yield
    except OSError as exc:
        if not pretrained:
            raise
        reason = getattr(exc, "reason", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PretrainedWeightsError(
            f"cannot fetch the pretrained weights of {source.library}:{source.name} ({str(reason)[:160]}); "
            "pretrained=True (--pretrained) downloads them on first use, which needs internet: run it once where "
            "there is a connection (the file is cached for later runs), or load the original weights from a file "
            "(--checkpoint PATH)"
        ) from exc


def build_model(
    name: str | ModelSource,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, ModelSource]:
    """Builds a torchvision or timm model by name.

    Args:
        name: Model name or a :class:`ModelSource`.
        pretrained: Load the library's pretrained weights (needs internet on first use).
        num_classes: Classifier size; ``None`` keeps the library default.
        in_chans: Input channels (timm models; torchvision models are built for 3).
        **kwargs: Further builder arguments.

    Returns:
        The model and the source it was built from (with the kwargs needed to rebuild it). The source
        is also recorded on the model (attribute ``_sharify_source``, kept by ``sharify`` and deep
        copies), so :func:`sharify.save` can store it without being told.

    Raises:
        ValueError: Unknown model name, or torchvision options its builder does not take.
        PretrainedWeightsError: ``pretrained`` weights that cannot be downloaded (no internet, no cached copy).
    """
    source = resolve_model_name(name) if isinstance(name, str) else name
    kw = dict(source.kwargs, **kwargs)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if source.library == "timm":
        import timm

        if in_chans is not None:
            kw["in_chans"] = in_chans
        with _download_errors(source, pretrained):
            model = timm.create_model(source.name, pretrained=pretrained, **kw)
    else:
        import torchvision

        if in_chans not in (None, 3):
            raise ValueError(
                f"torchvision's {source.name} is built for 3 input channels; use timm:{source.name} for in_chans"
            )
        weights = "DEFAULT" if pretrained else None
        if pretrained and num_classes is not None:
            raise ValueError("torchvision pretrained weights fix num_classes; build pretrained, then replace the head")
        if (
            not pretrained
            and "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(source.name)).parameters
        ):
            kw.setdefault("weights_backbone", None)  # detection/segmentation builders default to a pretrained backbone
        with _download_errors(source, pretrained):
            model = torchvision.models.get_model(source.name, weights=weights, **kw)
    built = ModelSource(source.library, source.name, kw)
    setattr(model, SOURCE_ATTR, built)
    return model, built
