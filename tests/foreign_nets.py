"""Model code written the way other projects write it: old CIFAR repositories, attention/recurrent context,
models that tie or parametrize their own convs, backbones inside bigger models.

sharify's own tests define these classes in the style of code nobody here wrote (``self.bn.forward(x)``,
vector additions beside residual blocks, ``weight_norm``, a conv module reused by several blocks), so the
analysis is tested against the habits of real model code, not only against tidy definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__: list[str] = []


# ----------------------------------------------------------------------------------------------------------
# Tracing: direct `submodule.forward(x)` calls, forwards with optional arguments
# ----------------------------------------------------------------------------------------------------------


class OldBasicBlock(nn.Module):
    """A CIFAR basic block as older repositories wrote it: submodules called through ``.forward`` directly."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, direct: bool = True) -> None:
        super().__init__()
        self.direct = direct
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.direct:
            out = F.relu(self.bn1.forward(self.conv1.forward(x)))
            out = self.bn2.forward(self.conv2.forward(out))
            return F.relu(out + self.shortcut.forward(x))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class OldCifarResNet(nn.Module):
    """An old-style CIFAR ResNet (3 stages of ``blocks`` basic blocks); ``direct=False`` is the same net with
    ordinary ``module(x)`` calls."""

    def __init__(self, blocks: int = 2, width: int = 8, num_classes: int = 10, direct: bool = True) -> None:
        super().__init__()
        self.direct = direct
        self.conv_reduce = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, planes = [], width
        for i, out in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            stage = [OldBasicBlock(planes, out, stride, direct)]
            stage += [OldBasicBlock(out, out, 1, direct) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            planes = out
        self.stage_1, self.stage_2, self.stage_3 = layers
        self.classifier = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.direct:
            x = F.relu(self.bn.forward(self.conv_reduce.forward(x)))
            x = self.stage_3.forward(self.stage_2.forward(self.stage_1.forward(x)))
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.classifier.forward(x)
        x = F.relu(self.bn(self.conv_reduce(x)))
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


# (end of tracing section)


# ----------------------------------------------------------------------------------------------------------
# Analysis: non-spatial additions, parametrized convs
# ----------------------------------------------------------------------------------------------------------


# (end of analysis section)


# ----------------------------------------------------------------------------------------------------------
# Ties: convs the model's authors already tied, models inside bigger models
# ----------------------------------------------------------------------------------------------------------


# (end of ties section)
