"""One epoch of training and one pass of evaluation, with AMP, accumulation, EMA and regularisers.

:class:`Trainer` bundles what a training step needs (model, optimizer, schedule, grad scaler, EMA,
loss, regulariser). :meth:`Trainer.train_epoch` runs the micro-batches of one epoch: forward under
autocast, loss (+ ``lambda_r`` * the regulariser) divided by the number of micro-batches in its
update (``accum_steps``, or fewer in an epoch's last update), backward (with DDP gradient
synchronisation only on the micro-batch that updates, except under ``static_graph``, where every
micro-batch synchronises), optional gradient clipping, optimizer step
through the ``GradScaler`` (fp16), schedule and EMA update. :func:`evaluate` computes loss and
top-1/top-5 accuracy. Both reduce their sums over ranks, so the numbers are those of the whole
data set.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .distributed import DistContext, all_reduce_sum
from .errors import DataError

__all__ = ["Trainer", "autocast_context", "evaluate", "resolve_amp"]

Regulariser = Callable[[nn.Module], Tensor]


def resolve_amp(amp: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA devices that support it, else ``"none"``; checks explicit choices.

    Raises:
        ValueError: Unknown mode, bf16/fp16 requested on a CPU (training runs in fp32 there), or bf16 on a
            GPU without bfloat16 support.
    """
    if amp not in ("auto", "none", "bf16", "fp16"):
        raise ValueError(f"unknown --amp {amp!r}; use auto, none, bf16 or fp16")
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp != "none" and device.type != "cuda":
        raise ValueError(f"--amp {amp} needs a CUDA device (--device cuda); on CPU training runs in fp32 (--amp none)")
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--amp bf16: this GPU does not support bfloat16; use --amp fp16 (with a grad scaler)")
    return amp


def autocast_context(amp: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of autocast contexts for the resolved ``amp`` mode (no-op for ``"none"``)."""
    if amp == "none":
        return nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _images(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _check_logits(logits: Tensor, num_classes: int | None) -> None:
    if num_classes is not None and logits.shape[-1] < num_classes:
        raise DataError(
            f"the model outputs {logits.shape[-1]} classes but the data has {num_classes}; "
            f"pass --num-classes {num_classes} to replace the head"
        )


@dataclass
class Trainer:
    """Everything one optimizer update needs. ``model`` may be DDP/compiled; ``module`` is the bare model."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ctx: DistContext
    criterion: nn.Module
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None
    accum_steps: int = 1
    clip_grad: float | None = None
    channels_last: bool = False
    lambda_r: float = 0.0
    regulariser: Regulariser | None = None
    num_classes: int | None = None
    num_updates: int = 0
    on_update: Callable[[int, int], None] | None = None
    show_progress: bool = True

    def _no_sync(self, update: bool) -> AbstractContextManager[Any]:
        # DDP(static_graph=True) does not support no_sync(): an internal assert on the first backward, and
        # gradients that silently stop being reduced once that is avoided (pytorch/pytorch#143580). Under a
        # static graph every micro-batch reduces: one all-reduce per micro-batch instead of per update, and
        # the same result, as each reduction averages the accumulated gradient, whose earlier part is
        # already identical on all ranks.
        no_sync = getattr(self.model, "no_sync", None)
        if update or no_sync is None or getattr(self.model, "static_graph", False):
            return nullcontext()
        return no_sync()

    def _step(self) -> None:
        if self.scaler is not None:
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip_grad:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)
        if self.ema is not None:
            self.ema.update(self.module, step=self.num_updates)

    def train_epoch(self, loader: Any, epoch: int, epochs: int) -> dict[str, float]:
        """Trains one epoch; returns global ``train_loss``, ``train_images``, ``train_seconds``, ``images_per_s``.

        ``images_per_s`` is over the whole epoch, data loading included, so one-time warm-up in the
        first epoch (``torch.compile`` compiling the model, cuDNN benchmarking) lowers that epoch's figure.
        """
        self.model.train()
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        seen = 0
        batches = len(loader)
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{epochs}",
            unit="batch",
            dynamic_ncols=True,
            leave=False,
            disable=not self.show_progress,
            file=sys.stderr,
        )
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for i, (images, labels) in enumerate(bar):
            # micro-batches i0 .. i0 + group - 1 make one update; the epoch's last group may be shorter
            i0 = i - i % self.accum_steps
            group = min(self.accum_steps, batches - i0)
            update = i + 1 == i0 + group
            images = _images(images, device, self.channels_last)
            labels = labels.to(device, non_blocking=True)
            with self._no_sync(update):
                with self.autocast():
                    logits = self.model(images)
                    if i == 0:
                        _check_logits(logits, self.num_classes)
                    loss = self.criterion(logits, labels)
                if self.lambda_r and self.regulariser is not None:
                    loss = loss + self.lambda_r * self.regulariser(self.module)
                scaled = loss / group  # the update's gradient: the mean over its micro-batches
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            if update:
                self._step()
                if self.on_update is not None:
                    self.on_update(epoch, self.num_updates)
            loss_sum += loss.detach().double() * len(labels)
            seen += len(labels)
            if self.show_progress and (i % 10 == 0 or i + 1 == batches):
                rate = seen * self.ctx.world_size / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}", refresh=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        total_loss, total = all_reduce_sum([float(loss_sum), float(seen)], self.ctx)
        seconds = max(all_reduce_sum([seconds], self.ctx)[0] / self.ctx.world_size, 1e-9)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"training loss is {total_loss} in epoch {epoch}; lower --lr or use --amp bf16")
        return {
            "train_loss": total_loss / max(total, 1),
            "train_images": int(total),
            "train_seconds": seconds,
            "images_per_s": total / seconds,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    ctx: DistContext,
    *,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    channels_last: bool = False,
    num_classes: int | None = None,
    show_progress: bool = False,
    desc: str = "val",
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (in %) of ``model`` over the (rank-sharded) ``loader``.

    ``show_progress`` draws a tqdm bar named ``desc`` on stderr (rank 0 of a run on a terminal).
    """
    was_training = model.training
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, device=ctx.device, dtype=torch.float64)  # loss, top1, top5, count
    bar = tqdm(
        loader, desc=desc, unit="batch", dynamic_ncols=True, leave=False, disable=not show_progress, file=sys.stderr
    )
    try:
        for i, (images, labels) in enumerate(bar):
            images = _images(images, ctx.device, channels_last)
            labels = labels.to(ctx.device, non_blocking=True)
            with autocast():
                logits = model(images)
            if i == 0:
                _check_logits(logits, num_classes)
            logits = logits.float()
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            hit = top == labels[:, None]
            sums[0] += criterion(logits, labels).double()
            sums[1] += hit[:, 0].sum()
            sums[2] += hit.any(dim=-1).sum()
            sums[3] += len(labels)
    finally:
        model.train(was_training)
    loss, top1, top5, count = all_reduce_sum(sums.tolist(), ctx)
    count = max(count, 1.0)
    if not math.isfinite(loss):  # accuracy of NaN logits would be a made-up number
        raise FloatingPointError(
            f"validation loss is {loss}: the model's outputs are not finite; check that --image-size suits the "
            "model, and lower --lr if training diverged"
        )
    return {
        "val_loss": loss / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "val_images": int(count),
    }
