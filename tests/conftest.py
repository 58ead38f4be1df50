"""Shared fixtures: deterministic seeds and small-CPU settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


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
