"""Helpers of the fine-tuning tests: the tiny sharified net, CLI error checks, a plain SGD trainer, small timm nets.

The net itself is :class:`tests.nets.TinyNet`; the image folders come from :mod:`tests.fake_data`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import sharify
from sharify.cli import main
from sharify.train import FinetuneConfig
from sharify.train.distributed import DistContext
from sharify.train.loop import Trainer
from tests.nets import TinyNet

#: The input TinyNet is analysed with: 12-px RGB, the size of the fake image folders.
EXAMPLE = torch.zeros(1, 3, 12, 12)

#: The fine-tuning settings both sides of the data-parallel comparison use (the two ranks in ddp_worker.py, the one
#: process in test_distributed.py); only the batch size differs, per rank or global.
DDP_COMPARISON = {"epochs": 1, "workers": 0, "lr": 0.1, "augment": False, "quiet": True, "device": "cpu"}


def tiny_shared() -> nn.Module:
    """A sharified :class:`~tests.nets.TinyNet`, the same weights every call."""
    torch.manual_seed(0)
    return sharify.sharify(TinyNet(), example_inputs=EXAMPLE)


def cli_error(args: list[str], capsys: pytest.CaptureFixture[str], status: int = 2) -> str:
    """Runs the command line, which must exit with ``status`` and one ``sharify: error: ...`` line; returns it."""
    assert main(args) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("sharify: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def sgd_trainer(
    model: nn.Module,
    accum_steps: int,
    *,
    wrapped: nn.Module | None = None,
    ctx: DistContext | None = None,
    clip_grad: float | None = None,
    **kw: Any,
) -> Trainer:
    """A :class:`~sharify.train.loop.Trainer` with plain SGD (lr 0.5) and no scheduler, running ``wrapped``
    (e.g. ``DDP(model)``; default: the model itself); ``kw`` are further Trainer arguments (``scaler``, ...)."""
    return Trainer(
        model=model if wrapped is None else wrapped,
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        scheduler=None,
        ctx=DistContext() if ctx is None else ctx,
        config=FinetuneConfig(accum_steps=accum_steps, clip_grad=clip_grad, quiet=True),
        **kw,
    )


def shrink_timm_resnets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``sharify finetune --model timm:resnet18`` (or ``resnet34``) build it with 8..64 channels.

    The command line only takes model names; the smallest timm/torchvision ResNets with two blocks
    per stage are still ~11M parameters, which dominate a smoke run's time on a small CPU.
    """
    import sharify.train.model as model_module

    build = model_module.build_model

    def small(source: Any, **kwargs: Any) -> Any:
        if source.library == "timm" and source.name in ("resnet18", "resnet34"):
            kwargs.setdefault("channels", SMALL_CHANNELS)
        return build(source, **kwargs)

    monkeypatch.setattr(model_module, "build_model", small)


#: Stage widths of the shrunk timm ResNets.
SMALL_CHANNELS = (8, 16, 32, 64)
