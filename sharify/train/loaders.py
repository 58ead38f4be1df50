"""Transforms and data loaders: what a model sees of a :class:`~sharify.train.data.DataBundle`.

* Small images (Fashion-MNIST, CIFAR, small ImageFolders): the images keep their native size (or
  ``image_size``); training augmentation is the standard random crop with padding + horizontal flip;
  normalisation uses the data set's statistics.
* Larger ImageFolder images: timm's ``create_transform`` with the model's data config
  (``resolve_data_config``: input size, interpolation, crop, mean/std) when it has one, else
  ImageNet defaults at 224 px.
* Channels follow the model: grayscale images are replicated for a 3-channel model and colour
  images converted for a 1-channel model.

Loaders shard with ``DistributedSampler`` (also in a single process, so the sample order depends
only on the seed and the epoch, which makes ``--resume`` exact), and the validation set is split
into disjoint rank shards so that reduced metrics count every image once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms as T

from ..analysis.shapes import patch_embed_size
from .data import DataBundle
from .distributed import DistContext
from .errors import DataError

__all__ = ["Loaders", "TransformedDataset", "build_loaders", "build_transforms", "model_in_chans"]

#: Images at most this large (in pixels per side) are treated as "small" (no resize-crop pipeline).
SMALL_IMAGE = 64
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TransformedDataset(Dataset[tuple[torch.Tensor, int]]):
    """Applies ``transform`` to the images of a dataset of ``(image, label)`` items."""

    def __init__(self, base: Dataset[Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


def model_in_chans(model: nn.Module) -> int | None:
    """Input channels of the model's first conv (``None`` when it has none)."""
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _model_data_config(model: nn.Module) -> dict[str, Any] | None:
    if not getattr(model, "pretrained_cfg", None):
        return None
    from timm.data import resolve_data_config

    return dict(resolve_data_config(model=model))


def _fit_stats(values: tuple[float, ...], chans: int) -> tuple[float, ...]:
    if len(values) == chans:
        return values
    if chans == 1:
        return (sum(values) / len(values),)
    return values * chans if len(values) == 1 else values[:chans]


def build_transforms(
    bundle: DataBundle,
    model: nn.Module,
    *,
    image_size: int | None = None,
    augment: bool = True,
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor], tuple[int, int, int]]:
    """Train and eval transforms for ``model`` on ``bundle``, and the resulting input shape ``(C, H, W)``.

    Raises:
        DataError: The model's input channels cannot be fed from the data (e.g. 2-channel models).
    """
    chans = model_in_chans(model) or bundle.in_chans
    if chans not in (1, 3):
        raise DataError(f"the model expects {chans} input channels; images give 1 (grayscale) or 3 (RGB)")
    convert: list[Any] = [] if chans == bundle.in_chans else [T.Grayscale(num_output_channels=chans)]
    native = bundle.image_size
    fixed = patch_embed_size(model)  # a ViT's patch embedding takes one image size only
    if image_size is None and fixed is not None and native != fixed:
        image_size = max(fixed)
    small = native is not None and max(native) <= SMALL_IMAGE and (image_size is None or image_size <= SMALL_IMAGE)
    if small:
        assert native is not None
        hw: tuple[int, int] = (image_size, image_size) if image_size else native
        mean, std = bundle.mean or (0.5,) * bundle.in_chans, bundle.std or (0.5,) * bundle.in_chans
        mean, std = _fit_stats(mean, chans), _fit_stats(std, chans)
        # ImageFolder images may differ in size: resize them all to the first image's (or image_size)
        resize = [T.Resize(hw)] if hw != native or bundle.name == "imagefolder" else []
        tail = [T.ToTensor(), T.Normalize(mean, std)]
        aug = [T.RandomCrop(hw, padding=max(1, min(hw) // 8)), T.RandomHorizontalFlip()] if augment else []
        return T.Compose(convert + resize + aug + tail), T.Compose(convert + resize + tail), (chans, *hw)

    from timm.data import create_transform

    cfg = _model_data_config(model) or {"interpolation": "bilinear", "crop_pct": 0.875}
    size = image_size or (cfg["input_size"][-1] if "input_size" in cfg else 224)
    mean = _fit_stats(tuple(cfg.get("mean", _IMAGENET_MEAN)), chans)
    std = _fit_stats(tuple(cfg.get("std", _IMAGENET_STD)), chans)
    common = {
        "input_size": (chans, size, size),
        "mean": mean,
        "std": std,
        "interpolation": cfg.get("interpolation", "bilinear"),
    }
    train = create_transform(is_training=True, no_aug=not augment, **common)
    val = create_transform(is_training=False, crop_pct=cfg.get("crop_pct", 0.875), **common)
    return T.Compose([*convert, train]), T.Compose([*convert, val]), (chans, size, size)


class _DataLoader(DataLoader[Any]):
    """A DataLoader whose workers' :class:`DataError` comes back with its own one-line message.

    PyTorch re-raises an exception of a worker process with the worker's traceback folded into the
    message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); the last
    line of that text is the original message.
    """

    def __iter__(self) -> Any:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError as exc:
                raise DataError(_original_message(exc)) from exc
            yield batch


def _original_message(exc: DataError) -> str:
    lines = str(exc).strip().splitlines()
    prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
    original = next((line for line in reversed(lines) if line.startswith(prefix)), None)
    return original[len(prefix) :] if original is not None else str(exc)


@dataclass
class Loaders:
    """Train/val loaders, the train sampler (``set_epoch`` it) and the loader's seed generator."""

    train: DataLoader[Any]
    val: DataLoader[Any]
    sampler: DistributedSampler[Any]
    generator: torch.Generator
    input_shape: tuple[int, int, int]

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Makes the epoch's shuffle and worker seeds a function of ``(seed, epoch)`` only."""
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(seed * 100_003 + epoch)


def build_loaders(
    bundle: DataBundle,
    model: nn.Module,
    ctx: DistContext,
    *,
    batch_size: int,
    workers: int = 2,
    seed: int = 0,
    image_size: int | None = None,
    augment: bool = True,
    eval_batch_size: int | None = None,
) -> Loaders:
    """Loaders for one process of a (possibly distributed) run; ``batch_size`` is per process."""
    train_tf, val_tf, shape = build_transforms(bundle, model, image_size=image_size, augment=augment)
    train = TransformedDataset(bundle.train, train_tf)
    n_val = len(bundle.val)  # type: ignore[arg-type]
    val = TransformedDataset(Subset(bundle.val, range(ctx.rank, n_val, ctx.world_size)), val_tf)
    per_rank = -(-len(train) // ctx.world_size)
    if per_rank == 0:
        raise DataError(f"the training set of {bundle.source} is empty")
    sampler: DistributedSampler[Any] = DistributedSampler(
        train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    generator = torch.Generator()
    pin = ctx.device.type == "cuda"
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        common["prefetch_factor"] = 4
    train_loader = _DataLoader(
        train,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=per_rank >= 2 * batch_size,  # keep the last partial batch only in tiny runs
        generator=generator,
        **common,
    )
    val_loader = _DataLoader(val, batch_size=eval_batch_size or 2 * batch_size, shuffle=False, **common)
    return Loaders(train_loader, val_loader, sampler, generator, shape)
