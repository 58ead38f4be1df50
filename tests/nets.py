"""The networks the tests build, written the way users write them.

sharify knows none of these classes: the tests compare its plan with arithmetic done here by hand.

* Small residual nets for any test that needs one: :class:`OneStageNet` (one stage of :class:`BasicBlock`),
  :class:`TinyNet` (two stages of BatchNorm or GroupNorm blocks; the fine-tuning tests' net),
  :class:`NormFreeNet` (biased convs, no normalisation, no head) and :class:`PreActNet` (pre-activation
  blocks: the last conv of a branch feeds the addition, not a BatchNorm).
* User habits the analysis must see through: :class:`LoopNet`, :class:`FancyNet`, :class:`FlatNet`, and
  :class:`PlainNet` (no residual connection at all).
* Random residual nets for the property tests: :class:`RandomNet` built from a :class:`NetSpec`.
* The CIFAR ResNets of the papers (:func:`cifar_resnet`, :func:`wide_resnet`, :class:`PreActResNet`): defined
  once, in ``benchmarks/cifar_models.py``, whose parameter counts the paper tables reproduce; re-exported here
  so that every test takes its models from this module.

Model code in the habits of other projects is in ``tests/foreign_nets.py``. A network that exists only to
show one odd pattern to one test is defined next to that test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# re-exported: the tests take every model from this module (see the module docstring)
from benchmarks.cifar_models import PreActResNet as PreActResNet
from benchmarks.cifar_models import cifar_resnet as cifar_resnet
from benchmarks.cifar_models import wide_resnet as wide_resnet


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(c // r, 1), 1)
        self.fc2 = nn.Conv2d(max(c // r, 1), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class FancyBlock(nn.Module):
    """Conv with bias + GroupNorm + SE + layer scale + drop path; residual written with torch.add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.norm_a = nn.GroupNorm(4, c)
        self.conv_b = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.norm_b = nn.GroupNorm(4, c)
        self.se = SE(c)
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.1))
        self.drop = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm_a(self.conv_a(x)))
        y = self.se(self.norm_b(self.conv_b(y)))
        return torch.add(x, self.drop(self.gamma * y))


class Head(nn.Module):
    """A head with data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean((2, 3))
        if x.abs().sum() > 0:  # data-dependent
            x = x / (x.norm(dim=1, keepdim=True) + 1e-6)
        return self.fc(x)


class LoopNet(nn.Module):
    """Functional stem, ``nn.ModuleList`` stages looped in forward, ``+=`` residuals done in the loop."""

    def __init__(self, widths: tuple[int, ...] = (16, 32), depth: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.downs = nn.ModuleList()
        self.branches = nn.ModuleList()
        prev = widths[0]
        for w in widths:
            self.downs.append(nn.Conv2d(prev, w, 3, stride=1 if w == prev else 2, padding=1))
            self.branches.append(
                nn.ModuleList(
                    nn.Sequential(nn.Conv2d(w, w, 1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1))
                    for _ in range(depth)
                )
            )
            prev = w
        self.head = Head(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for down, branches in zip(self.downs, self.branches):
            x = F.relu(down(x))
            for f in branches:
                y = f(x)
                x += y
        return self.head(x)


class FancyNet(nn.Module):
    def __init__(self, c: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*(FancyBlock(c) for _ in range(depth)))
        self.head = Head(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class FlatNet(nn.Module):
    """Everything in the root's forward: parallel ModuleLists indexed in a loop, ``x.add(y)``."""

    def __init__(self, c: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(depth))
        self.bn1 = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(depth))
        self.conv2 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(depth))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(len(self.conv1)):
            y = self.conv2[i](F.relu(self.bn1[i](self.conv1[i](x))))
            x = F.relu(x.add(y))
        return self.fc(x.mean((2, 3)))


class PlainNet(nn.Module):
    """No residual connection at all (VGG-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


# --- small residual nets ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv -> BN -> ReLU -> conv (with bias), added to the input, then ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class OneStageNet(nn.Module):
    """A small user-written residual net: one stage of ``depth`` blocks, no torchvision/timm source to rebuild
    it from. sharify shares the blocks' ``conv2`` (``blocks.conv2``)."""

    def __init__(self, width: int = 8, depth: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*(BasicBlock(width) for _ in range(depth)))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class TinyBlock(nn.Module):
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
    """Two stages of two residual blocks (``norm="bn"`` or ``"gn"``): sharify shares ``conv2`` within each stage."""

    def __init__(self, num_classes: int = 3, in_chans: int = 3, width: int = 8, norm: str = "bn") -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(TinyBlock(width, norm), TinyBlock(width, norm))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.layer2 = nn.Sequential(TinyBlock(2 * width, norm), TinyBlock(2 * width, norm))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.down(self.layer1(F.relu(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class NormFreeBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class NormFreeNet(nn.Module):
    """A stem and three residual blocks of biased convs (8 channels): no normalisation, no head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(NormFreeBlock(8), NormFreeBlock(8), NormFreeBlock(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (WRN style): conv2 feeds the addition, not a BatchNorm."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))


class PreActNet(nn.Module):
    """A stem, one stage of four :class:`PreActBlock` (16 channels), the final BN -> ReLU and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stage = nn.Sequential(*(PreActBlock(16) for _ in range(4)))
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.stage(self.stem(x)))).mean((2, 3)))


# --- random residual nets for property-based tests -------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    width: int
    depth: int
    stride: int


@dataclass(frozen=True)
class NetSpec:
    block: str  # "basic" | "bottleneck" | "preact"
    stages: tuple[StageSpec, ...]
    bias: bool
    norm: str  # "bn" | "gn" | "none"
    add: str  # "+" | "+=" | "torch.add" | "add" | "add_" | "alpha" | "layerscale"
    container: str  # "sequential" | "modulelist"


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(2 if c % 2 == 0 else 1, c)
    return nn.Identity()


class RandomBlock(nn.Module):
    def __init__(self, spec: NetSpec, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.kind, self.add = spec.block, spec.add
        mid = max(cout // 4, 1) if spec.block == "bottleneck" else cout
        b = spec.bias
        if spec.block == "bottleneck":
            convs = [nn.Conv2d(cin, mid, 1, bias=b), nn.Conv2d(mid, mid, 3, stride, 1, bias=b)]
            self.convs = nn.ModuleList([*convs, nn.Conv2d(mid, cout, 1, bias=b)])
        else:
            self.convs = nn.ModuleList(
                [nn.Conv2d(cin, mid, 3, stride, 1, bias=b), nn.Conv2d(mid, cout, 3, 1, 1, bias=b)]
            )
        self.norms = nn.ModuleList(_norm(spec.norm, c.in_channels if spec.block == "preact" else c.out_channels)
                                   for c in self.convs)  # fmt: skip
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=b) if (cin != cout or stride != 1) else None
        self.scale = nn.Parameter(torch.ones(1, cout, 1, 1)) if spec.add == "layerscale" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x) if self.kind == "preact" else F.relu(self._add(x))

    def _add(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if self.kind == "preact":
                y = conv(F.relu(norm(y)))
            else:  # torchvision style: no activation before the add
                y = norm(conv(y)) if i == last else F.relu(norm(conv(y)))
        s = x if self.proj is None else self.proj(x)
        if self.add == "+":
            return y + s
        if self.add == "+=":
            y += s
            return y
        if self.add == "torch.add":
            return torch.add(s, y)
        if self.add == "add":
            return s.add(y)
        if self.add == "add_":
            return y.add_(s)
        if self.add == "alpha":
            return y * 0.2 + s
        assert self.scale is not None
        return s + self.scale * y


class RandomNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        c0 = spec.stages[0].width
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        stages = []
        cin = c0
        for st in spec.stages:
            blocks = [RandomBlock(spec, cin if i == 0 else st.width, st.width, st.stride if i == 0 else 1)
                      for i in range(st.depth)]  # fmt: skip
            cin = st.width
            stages.append(nn.Sequential(*blocks) if spec.container == "sequential" else nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            if isinstance(stage, nn.Sequential):
                x = stage(x)
            else:
                for block in stage:
                    x = block(x)
        return self.fc(x.mean((2, 3)))
