"""Small datasets written to disk in the layouts sharify.train reads: an ImageFolder tree, Fashion-MNIST's idx files.

The images are learnable (brightness encodes the class) and deterministic (fixed seeds), so a short run on them
trains and a repeated run gives the same files.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_image_folder(
    root: Path, *, classes: int = 3, train: int = 8, val: int = 4, size: int = 12, gray: bool = False
) -> Path:
    """Writes ``root/{train,val}/class<k>/<i>.png``: RGB (or grayscale) noise whose brightness depends on the class."""
    rng = np.random.default_rng(0)
    shape = (size, size) if gray else (size, size, 3)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.random(shape) * 60 + c * 90
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def write_idx(path: Path, data: torch.Tensor | np.ndarray) -> None:
    """Writes ``data`` (values 0..255) as a gzipped idx file of unsigned bytes, the format of (Fashion-)MNIST."""
    array = np.asarray(data).astype(np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_fashion_mnist(root: Path, n: int = 96) -> Path:
    """Idx files in Fashion-MNIST's layout (``n`` train and ``n`` test images): images whose brightness encodes
    the label (learnable)."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix in ("train", "t10k"):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = (labels.view(-1, 1, 1) * 25 + torch.randint(0, 20, (n, 28, 28), generator=g)).clamp(0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root
