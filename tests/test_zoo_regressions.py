"""Regression tests for structures met in the torchvision/timm zoo sweep (benchmarks/coverage.py).

Each test is a tiny hand-written module reproducing the structure that once failed or misbehaved, so the
fix is checked without building zoo models.
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class _LayerScaleNet(nn.Module):
    """Parameters read in forward (layer scale, a tied scale registered under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(8) for _ in range(3))
        self.gammas = nn.ParameterList(nn.Parameter(torch.full((8, 1, 1), 0.1)) for _ in range(3))
        self.tied = self.gammas[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, gamma in zip(self.blocks, self.gammas, strict=True):
            x = x + (block(x) - x) * gamma * self.tied
        return x


def test_parameters_read_in_forward_trace_to_the_same_get_attr_nodes_as_fx() -> None:
    # The tracer looks parameter paths up in a map instead of fx's scan of named_parameters().
    from torch import fx

    from sharify.tracing import trace

    model = _LayerScaleNet()
    ours = [n.target for n in trace(model).graph.nodes if n.op == "get_attr"]
    theirs = [n.target for n in fx.Tracer().trace(model).nodes if n.op == "get_attr"]
    # A tied parameter gets one node, named by its first path in named_parameters() (the root's own first).
    assert ours == theirs == ["gammas.0", "tied", "gammas.2"]
