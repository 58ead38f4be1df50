"""Shared fixtures: deterministic seeds and small-CPU settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

#: The repository root (README.md, benchmarks/, examples/), wherever a test file sits below tests/.
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The fine-tuning tests run tiny tensors, for which contended threads on a small shared CPU are
    many times slower than one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same state_dict keys (in order) and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Non-default values everywhere, BatchNorm statistics included, so a round trip or a rebuild from scratch
    has something to lose: floats drawn anew (running variances positive), integer buffers set to 7."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(
                    torch.rand(t.shape, generator=gen) + 0.5
                    if "running_var" in name
                    else torch.randn(t.shape, generator=gen)
                )
            else:
                t.fill_(7)
    return model
