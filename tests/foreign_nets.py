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


# (end of tracing section)


# ----------------------------------------------------------------------------------------------------------
# Analysis: non-spatial additions, parametrized convs
# ----------------------------------------------------------------------------------------------------------


# (end of analysis section)


# ----------------------------------------------------------------------------------------------------------
# Ties: convs the model's authors already tied, models inside bigger models
# ----------------------------------------------------------------------------------------------------------


class _TiedBlock(nn.Module):
    """A basic residual block whose 3x3 convs may be given from outside (shared with other blocks)."""

    def __init__(self, channels: int, conv2: nn.Conv2d | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv2 if conv2 is not None else nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ReusedConvNet(nn.Module):
    """Recurrent-residual style (e.g. R2U-Net, ALBERT-like weight reuse): one conv module is passed to every
    block of a stage, so the model's state_dict lists one tensor under several keys."""

    def __init__(self, channels: int = 8, blocks: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        reused = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(*[_TiedBlock(channels, reused) for _ in range(blocks)])
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.layer2 = nn.Sequential(*[_TiedBlock(2 * channels) for _ in range(blocks)])
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.down(self.layer1(F.relu(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tie_by_assignment(model: nn.Module, source: str, *targets: str) -> nn.Module:
    """``model.<target>.weight = model.<source>.weight`` for every target, as model code ties layers by hand."""
    weight = model.get_submodule(source).weight
    for target in targets:
        model.get_submodule(target).weight = weight
    return model


class TwoStreamNet(nn.Module):
    """A two-stream network (RGB + flow style): two small ResNet trunks and a fused head. Each trunk can be
    sharified on its own (``sharify(net.rgb, inplace=True)``)."""

    def __init__(self, channels: int = 8, num_classes: int = 4) -> None:
        super().__init__()

        def trunk(in_chans: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(in_chans, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                *[_TiedBlock(channels) for _ in range(3)],
            )

        self.rgb = trunk(3)
        self.flow = trunk(2)
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        a = F.adaptive_avg_pool2d(self.rgb(rgb), 1).flatten(1)
        b = F.adaptive_avg_pool2d(self.flow(flow), 1).flatten(1)
        return self.head(torch.cat([a, b], 1))


# (end of ties section)
