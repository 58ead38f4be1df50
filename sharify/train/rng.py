"""Random-number state of a training process: seeding, and saving/restoring it for exact resumes.

Shuffling and DataLoader worker seeds are derived from ``(seed, epoch)`` (:mod:`sharify.train.loaders`);
everything else that draws random numbers in the main process (augmentation without workers,
dropout, drop-path) uses the global generators, whose state is saved in each checkpoint.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "seed_everything", "set_rng_state"]


def get_rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy RNG states, loadable with ``torch.load(weights_only=True)``."""
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores a state returned by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
