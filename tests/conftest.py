"""Shared fixtures: deterministic seeds and small-CPU settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same state_dict keys (in order) and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
