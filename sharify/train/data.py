"""Where training images come from: ImageFolder directories, Fashion-MNIST idx files, CIFAR.

:func:`load_data` turns a data *spec* into a :class:`DataBundle` of untransformed train/val datasets
(items are ``(PIL image, class index)``) plus what the model needs to know: class names, image
channels, native image size and normalisation statistics. Transforms are chosen later, with the
model in hand (:mod:`sharify.train.loaders`).

Specs:
    * a directory with ``train/`` and ``val/`` (or ``validation/``/``test/``) sub-directories in
      torchvision ``ImageFolder`` layout (one sub-directory per class);
    * ``"fashion-mnist"``: the original idx files (``train-images-idx3-ubyte[.gz]`` ...) in ``root``,
      in ``root/FashionMNIST/raw`` (torchvision's layout) or, when no root is given, in
      :data:`FASHION_MNIST_SYSTEM_DIR` (Debian package ``dataset-fashion-mnist``); a directory that
      holds those files also works as a spec;
    * ``"cifar10"`` / ``"cifar100"``: torchvision's datasets in ``root`` (never downloaded).

Example:
    >>> bundle = load_data("fashion-mnist", subset=100)  # doctest: +SKIP
    >>> bundle.num_classes, bundle.in_chans, bundle.image_size  # doctest: +SKIP
    (10, 1, (28, 28))
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from .errors import DataError

__all__ = ["FASHION_MNIST_SYSTEM_DIR", "DataBundle", "IdxImageDataset", "load_data", "read_idx"]

logger = logging.getLogger(__name__)

#: Where the Debian package ``dataset-fashion-mnist`` installs the idx files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Per-channel (mean, std) of the training sets, for normalisation.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_VAL_DIRS = ("val", "validation", "test")
_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}


@dataclass(frozen=True)
class DataBundle:
    """Train and validation datasets (untransformed) and their properties.

    Attributes:
        name: ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"`` or ``"imagefolder"``.
        train: Training set; items are ``(PIL.Image, int)``.
        val: Validation set, same item type.
        classes: Class names (index = label).
        in_chans: Channels of the images (1 for grayscale).
        image_size: ``(H, W)`` of the images when they all share one, else ``None``.
        mean: Normalisation mean per channel, ``None`` to use the model's data config.
        std: Normalisation std per channel.
        source: Where the data was read from.
    """

    name: str
    train: Dataset[Any]
    val: Dataset[Any]
    classes: tuple[str, ...]
    in_chans: int
    image_size: tuple[int, int] | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_idx(path: str | Path) -> torch.Tensor:
    """Reads an idx file (the MNIST format; gzip-compressed when the name ends in ``.gz``).

    Raises:
        DataError: The file is not a valid idx file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(
            f"cannot read {path}: {exc}; reinstall the data set (apt-get install dataset-fashion-mnist)"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number); point --data-root at the original files")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise DataError(f"{path} is truncated: expected {count} values of shape {dims}; re-fetch the file")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


class IdxImageDataset(Dataset[tuple[Image.Image, int]]):
    """Grayscale images and labels held in memory (read from idx files), served as PIL images.

    Args:
        images: ``uint8`` tensor ``(N, H, W)``.
        targets: Integer labels ``(N,)``.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.ndim != 3 or len(images) != len(targets):
            raise DataError(f"idx images {tuple(images.shape)} and labels {tuple(targets.shape)} do not match")
        self.images = images
        self.targets = targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index].numpy(), mode="L"), int(self.targets[index])


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _find_idx_dir(root: Path | None) -> Path | None:
    candidates = [FASHION_MNIST_SYSTEM_DIR] if root is None else [root, root / "FashionMNIST" / "raw"]
    for folder in candidates:
        if _idx_file(folder, "train-images-idx3-ubyte") is not None:
            return folder
    return None


def _fashion_mnist(root: Path | None) -> DataBundle:
    folder = _find_idx_dir(root)
    if folder is None:
        where = f"{root} or {root}/FashionMNIST/raw" if root else str(FASHION_MNIST_SYSTEM_DIR)
        raise DataError(
            f"Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) not found in {where}; install them with "
            "`apt-get install dataset-fashion-mnist` or pass --data-root DIR"
        )
    parts = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        files = [_idx_file(folder, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        if None in files:
            raise DataError(f"{folder} lacks {prefix}-images/labels idx files; the data set is incomplete")
        parts[split] = IdxImageDataset(read_idx(files[0]), read_idx(files[1]))  # type: ignore[arg-type]
    height, width = parts["train"].images.shape[1:]
    mean, std = STATS["fashion-mnist"]
    return DataBundle(
        "fashion-mnist", parts["train"], parts["val"], FASHION_MNIST_CLASSES, 1, (height, width), mean, std, str(folder)
    )


def _cifar(name: str, root: Path | None) -> DataBundle:
    import torchvision

    if root is None:
        raise DataError(f"--data {name} needs --data-root DIR holding torchvision's {name} files (no downloads here)")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train, val = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError as exc:
        raise DataError(
            f"{name} not found in {root} ({exc}); fetch it once with torchvision.datasets.{cls.__name__}"
            f"({str(root)!r}, download=True) on a machine with internet"
        ) from exc
    mean, std = STATS[name]
    return DataBundle(name, train, val, tuple(train.classes), 3, (32, 32), mean, std, str(root))


def _image_folder(root: Path) -> DataBundle:
    import torchvision

    train_dir = root / "train"
    val_dir = next((root / d for d in _VAL_DIRS if (root / d).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())[:5]
        raise DataError(
            f"{root} is not an ImageFolder data set: expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg "
            f"(found sub-directories {found}); arrange the images that way"
        )
    try:
        train = torchvision.datasets.ImageFolder(str(train_dir))
        val = torchvision.datasets.ImageFolder(str(val_dir))
    except FileNotFoundError as exc:
        raise DataError(f"{exc}; each class needs its own sub-directory with images") from exc
    if len(train.classes) < 2:
        raise DataError(
            f"{train_dir} holds {len(train.classes)} class folder ({', '.join(train.classes)}): a classifier needs "
            "at least 2 classes (with one, every prediction is right); add a sub-directory per class"
        )
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DataError(
            f"class folders differ between {train_dir} and {val_dir} (e.g. {only}); both splits need the same classes"
        )
    first = train.samples[0][0]
    try:
        with Image.open(first) as image:
            size, mode = image.size, image.mode
    except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(_unreadable(first, exc)) from exc
    in_chans = 1 if mode in ("L", "I", "I;16", "1") else 3
    # ImageFolder's loader converts to RGB; serve grayscale folders as "L" so that in_chans=1 models fit.
    for ds in (train, val):
        ds.loader = _gray_loader if in_chans == 1 else _rgb_loader
    return DataBundle("imagefolder", train, val, tuple(train.classes), in_chans, (size[1], size[0]), source=str(root))


def _unreadable(path: str, exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its message repeats the path, or names a file object
        reason = "not an image file that PIL can identify"
    else:
        reason = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    return f"cannot read image {path} ({reason}); delete or replace the file"


def _load_image(path: str, mode: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except OSError as exc:  # corrupt, truncated or not an image (PIL.UnidentifiedImageError)
        raise DataError(_unreadable(path, exc)) from exc


def _rgb_loader(path: str) -> Image.Image:
    return _load_image(path, "RGB")


def _gray_loader(path: str) -> Image.Image:
    return _load_image(path, "L")


def _subset(dataset: Dataset[Any], n: int | None, seed: int) -> Dataset[Any]:
    total = len(dataset)  # type: ignore[arg-type]
    if n is None or n >= total:
        return dataset
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    index = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(dataset, index.tolist())


def load_data(
    spec: str | Path,
    *,
    root: str | Path | None = None,
    subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Loads a data set by name or directory (see the module docstring for the specs).

    Args:
        spec: ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"`` or a directory.
        root: Directory of the named data sets.
        subset: Keep a fixed random subset of this many training images (smoke runs).
        val_subset: Same for the validation set; defaults to ``subset``.
        seed: Seed of the subset draw.

    Raises:
        DataError: Missing directory or files, wrong layout, mismatched class folders, or an unreadable
            first image. ImageFolder images that turn out unreadable during training raise ``DataError``
            naming the file, also from DataLoader workers (:mod:`sharify.train.loaders`).
    """
    name = str(spec).lower()
    root_path = Path(root) if root is not None else None
    if name in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        bundle = _fashion_mnist(root_path)
    elif name in ("cifar10", "cifar100"):
        bundle = _cifar(name, root_path)
    else:
        path = Path(spec)
        if path.exists() and not path.is_dir():
            raise DataError(
                f"data {path} is a file, not a directory; pass an ImageFolder directory with train/ and val/ "
                "(or one holding the Fashion-MNIST idx files), or one of fashion-mnist, cifar10, cifar100"
            )
        if not path.is_dir():
            raise DataError(
                f"data directory {path} does not exist; pass an ImageFolder directory with train/ and val/, "
                "or one of fashion-mnist, cifar10, cifar100"
            )
        bundle = _fashion_mnist(path) if _find_idx_dir(path) else _image_folder(path)
    val_n = val_subset if val_subset is not None else subset
    bundle = replace(bundle, train=_subset(bundle.train, subset, seed), val=_subset(bundle.val, val_n, seed + 1))
    sizes = len(bundle.train), len(bundle.val)  # type: ignore[arg-type]
    logger.info(
        "data %s from %s: %d train / %d val images, %d classes", bundle.name, bundle.source, *sizes, bundle.num_classes
    )
    return bundle
