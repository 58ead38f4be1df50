"""The training loop and its checkpoints: gradient accumulation, memory format, retention, interruption."""

from __future__ import annotations

import copy

import pytest
import torch
from finetune_utils import TinyNet
from torch import nn

import sharify
from sharify.train.distributed import DistContext
from sharify.train.loop import Trainer

EXAMPLE = torch.zeros(1, 3, 12, 12)
pytestmark = pytest.mark.usefixtures("one_thread")


def _sgd_trainer(model: nn.Module, accum_steps: int) -> Trainer:
    return Trainer(
        model=model,
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        scheduler=None,
        ctx=DistContext(),
        criterion=nn.CrossEntropyLoss(),
        accum_steps=accum_steps,
        show_progress=False,
    )


def test_accumulation_equals_one_big_batch_also_for_a_short_last_group() -> None:
    batches = [(torch.randn(4, 3, 12, 12), torch.randint(0, 3, (4,))) for _ in range(5)]
    start = sharify.sharify(TinyNet(norm="gn"), example_inputs=EXAMPLE)  # no BatchNorm: batch-size independent
    accumulated, big = copy.deepcopy(start), copy.deepcopy(start)
    trainer = _sgd_trainer(accumulated, accum_steps=3)
    trainer.train_epoch(batches, 1, 1)  # updates after micro-batches 3 and 5: groups of 3 and 2
    merged = [tuple(torch.cat(t) for t in zip(*group, strict=True)) for group in (batches[:3], batches[3:])]
    _sgd_trainer(big, accum_steps=1).train_epoch(merged, 1, 1)  # the same two updates, each one batch
    assert trainer.num_updates == 2
    a, b = accumulated.state_dict(), big.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    moved = a["sharify_shared.layer1.conv2.weight"] - start.state_dict()["sharify_shared.layer1.conv2.weight"]
    assert moved.abs().max() > 1e-3
