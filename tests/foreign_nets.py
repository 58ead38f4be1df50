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


class CachingBlock(nn.Module):
    """A residual block that caches on itself what its forward computes the first time, as torchvision's
    ``MultiScaleRoIAlign`` (an attribute) and LeViT's attention (a dict keyed by device) do."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.scale: torch.Tensor | None = None
        self.bias_cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.scale = x.new_ones(x.shape[1]).view(1, -1, 1, 1)
        key = str(x.device)
        if key not in self.bias_cache:
            self.bias_cache[key] = x.new_zeros(1, x.shape[1], 1, 1)
        y = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return F.relu(x + y * self.scale + self.bias_cache[key])


class CachingNet(nn.Module):
    def __init__(self, c: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*(CachingBlock(c) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


class ConstantStemNet(nn.Module):
    """A stem whose forward creates a tensor (``torch.tensor([...])``) as timm's CSATv2 DCT stem does: torch.fx
    registers it on the traced root as ``_tensor_constant0``."""

    def __init__(self, c: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*(CachingBlock(c) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)
        return self.blocks(self.stem(x)).mean((2, 3))


# (end of tracing section)


# ----------------------------------------------------------------------------------------------------------
# Analysis: non-spatial additions, parametrized convs
# ----------------------------------------------------------------------------------------------------------


class CifarBasicBlock(nn.Module):
    """The BasicBlock of the popular CIFAR repositories: ``out += self.shortcut(x)``, an empty
    ``nn.Sequential`` as the identity shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        out += self.shortcut(x)
        return F.relu(out)


class ContextGatedBlock(CifarBasicBlock):
    """A block that carries a recurrent context ``h`` (N, context) from block to block, LSTM-style: the
    gate ``tanh(fc(pool(out)) + h)`` is a vector addition, and the context rescales the branch."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, context: int = 6) -> None:
        super().__init__(in_planes, planes, stride)
        self.gate = nn.Linear(planes, context)
        self.scale = nn.Linear(context, planes)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, h = inputs
        out = self.residual(x)
        h = torch.tanh(self.gate(out.mean((2, 3))) + h)
        out = out * torch.sigmoid(self.scale(h))[:, :, None, None]
        out += self.shortcut(x)
        return F.relu(out), h


class CifarResNet(nn.Module):
    """A CIFAR ResNet as the popular repositories write it (``_make_layer``, ``F.avg_pool2d``), with an
    optional context carried across all blocks.

    Args:
        num_blocks: Blocks per stage (channels 8, 16, ...; each stage after the first halves the resolution).
        context: ``None``: plain blocks. ``"gate"``: :class:`ContextGatedBlock` everywhere, its context
            starting from a learned ``h0``. ``"sum"``: plain blocks, and a context vector accumulated over
            all blocks (``ctx = ctx + fc_i(pool(x))``) that the classifier reads with the features.
            ``"pooled"``: the same context kept as ``(N, C, 1, 1)`` maps and computed by 1x1 convs (GCNet style).
    """

    def __init__(self, num_blocks: tuple[int, ...] = (3, 3), num_classes: int = 10, context: str | None = None) -> None:
        super().__init__()
        self.context = context
        self.in_planes = 8
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        layers = [self._make_layer(8 * 2**i, n, 1 if i == 0 else 2) for i, n in enumerate(num_blocks)]
        self.layers = nn.ModuleList(layers)
        width = self.in_planes
        if context == "gate":
            self.h0 = nn.Parameter(torch.zeros(1, 6))
        if context == "sum":
            self.readouts = nn.ModuleList(nn.Linear(b.conv2.out_channels, width) for layer in layers for b in layer)
        if context == "pooled":
            self.readouts = nn.ModuleList(nn.Conv2d(b.conv2.out_channels, width, 1) for layer in layers for b in layer)
        self.linear = nn.Linear(width, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks: list[nn.Module] = []
        for s in [stride] + [1] * (num_blocks - 1):
            block = ContextGatedBlock if self.context == "gate" else CifarBasicBlock
            blocks.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.context == "gate":
            h = self.h0.expand(x.shape[0], -1)
            for layer in self.layers:
                out, h = layer((out, h))
        elif self.context in ("sum", "pooled"):
            ctx = torch.zeros_like(out[:, :1, 0, 0] if self.context == "sum" else out[:, :1, :1, :1])
            blocks = [block for layer in self.layers for block in layer]
            for block, readout in zip(blocks, self.readouts):
                out = block(out)
                if self.context == "sum":
                    ctx = ctx + readout(out.mean((2, 3)))
                else:
                    ctx = ctx + readout(F.adaptive_avg_pool2d(out, 1))
            return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1) + ctx.flatten(1))
        else:
            for layer in self.layers:
                out = layer(out)
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


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
