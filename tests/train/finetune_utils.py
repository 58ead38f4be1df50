"""Helpers of the fine-tuning tests: a tiny synthetic ImageFolder and a tiny residual net."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


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


class Block(nn.Module):
    def __init__(self, width: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.n1 = nn.GroupNorm(2, width) if norm == "gn" else nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.n2 = nn.GroupNorm(2, width) if norm == "gn" else nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n2(self.conv2(F.relu(self.n1(self.conv1(x)))))
        return F.relu(x + y)


class TinyNet(nn.Module):
    """Two stages of two residual blocks: sharify shares ``conv2`` within each stage."""

    def __init__(self, num_classes: int = 3, in_chans: int = 3, width: int = 8, norm: str = "bn") -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(Block(width, norm), Block(width, norm))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.layer2 = nn.Sequential(Block(2 * width, norm), Block(2 * width, norm))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.down(self.layer1(F.relu(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def shrink_timm_resnets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``sharify finetune --model timm:resnet18`` (or ``resnet34``) build it with 8..64 channels.

    The command line only takes model names; the smallest timm/torchvision ResNets with two blocks
    per stage are still ~11M parameters, which dominate a smoke run's time on a small CPU.
    """
    import sharify.train.model as model_module

    build = model_module.build_model

    def small(source: Any, **kwargs: Any) -> Any:
        if source.library == "timm" and source.name in ("resnet18", "resnet34"):
            kwargs.setdefault("channels", SMALL_CHANNELS)
        return build(source, **kwargs)

    monkeypatch.setattr(model_module, "build_model", small)


#: Stage widths of the shrunk timm ResNets.
SMALL_CHANNELS = (8, 16, 32, 64)
