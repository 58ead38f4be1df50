"""One epoch of training and one pass of evaluation, with AMP, accumulation, EMA and regularisers.

:class:`Trainer` bundles what a training step needs (model, optimizer, schedule, grad scaler, EMA,
regulariser) with the run's :class:`~sharify.train.FinetuneConfig`, which sets the loss, autocast,
accumulation, clipping and memory format. :meth:`Trainer.train_epoch` runs the micro-batches of one
epoch: forward under autocast, loss (cross-entropy, or with a :class:`~sharify.train.distill.Distiller` the
distillation loss against its teacher; + ``lambda_r`` * the regulariser) divided by the number of
micro-batches in its update (``accum_steps``, or fewer in an epoch's last update), backward (with DDP
gradient synchronisation only on the micro-batch that updates, except under ``static_graph``, where
every micro-batch synchronises), optional gradient clipping, optimizer step through the
``GradScaler`` (fp16), schedule and EMA update. :func:`evaluate` computes loss and top-1/top-5
accuracy. Both reduce their sums over ranks, so the numbers are those of the whole data set.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .config import FinetuneConfig
from .distill import Distiller
from .distributed import DistContext, all_reduce_sum
from .errors import DataError

__all__ = ["Trainer", "autocast_context", "evaluate", "progress_shown", "resolve_amp"]

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


def progress_shown(config: FinetuneConfig, ctx: DistContext) -> bool:
    """Whether this process draws progress bars: rank 0, not ``config.quiet``, and stderr a terminal."""
    return ctx.is_main and not config.quiet and sys.stderr.isatty()


def _progress(loader: Any, desc: str, show: bool) -> Any:
    """``loader`` wrapped in a tqdm bar named ``desc`` on stderr, drawn only when ``show``."""
    return tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, leave=False, disable=not show, file=sys.stderr)


def _check_logits(logits: Tensor, num_classes: int | None) -> None:
    if num_classes is not None and logits.shape[-1] < num_classes:
        raise DataError(
            f"the model outputs {logits.shape[-1]} classes but the data has {num_classes}; "
            f"pass --num-classes {num_classes} to replace the head"
        )


@dataclass
class Trainer:
    """Everything one optimizer update needs: the objects that train, and the run's settings.

    The settings are read from ``config`` (a :class:`~sharify.train.FinetuneConfig`): ``accum_steps``,
    ``clip_grad``, ``channels_last``, ``lambda_r``, ``label_smoothing`` (the loss), ``amp`` (autocast, resolved
    for ``ctx.device``) and ``quiet`` (progress bars, drawn only by rank 0 on a terminal); from them it
    derives ``criterion``, ``autocast`` and ``show_progress``.

    Attributes:
        model: What the forward runs: the DDP wrapper and/or ``torch.compile`` of ``module``, or ``module``.
        module: The bare model (gradient clipping, regulariser and EMA read it).
        optimizer: The optimizer.
        scheduler: A timm scheduler (``step_update`` after every update), or ``None``.
        ctx: The process's place in the run.
        config: The run's settings.
        scaler: The fp16 grad scaler, or ``None``.
        ema: A timm ``ModelEmaV3`` of ``module``, or ``None``.
        regulariser: Added to the loss, weighted by ``config.lambda_r`` (``sharify.orthogonality_loss``).
        num_classes: The data's classes: the first batch's logits must have at least as many.
        num_updates: Optimizer updates so far (the schedule's position); counts on.
        on_update: Called as ``on_update(epoch, num_updates)`` after every update.
        distiller: The teacher and distillation loss (``config.distill``), or ``None`` for the cross-entropy.
    """

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ctx: DistContext
    config: FinetuneConfig
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None
    regulariser: Regulariser | None = None
    num_classes: int | None = None
    num_updates: int = 0
    on_update: Callable[[int, int], None] | None = None
    distiller: Distiller | None = None
    criterion: nn.Module = field(init=False)
    autocast: Callable[[], AbstractContextManager[Any]] = field(init=False)
    show_progress: bool = field(init=False)
    _term_sums: dict[str, Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)
        self.autocast = autocast_context(resolve_amp(self.config.amp, self.ctx.device), self.ctx.device)
        self.show_progress = progress_shown(self.config, self.ctx)

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
        clip_grad = self.config.clip_grad
        if self.scaler is not None:
            if clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.module.parameters(), clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip_grad:
                nn.utils.clip_grad_norm_(self.module.parameters(), clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)
        if self.ema is not None:
            self.ema.update(self.module, step=self.num_updates)

    def _loss(self, images: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        """The cross-entropy, or the distillation loss (its terms summed, weighted by images, for the epoch)."""
        if self.distiller is None:
            return self.criterion(logits, labels)
        loss, terms = self.distiller.loss(images, logits, labels)
        for name, value in terms.items():
            total = self._term_sums.setdefault(name, torch.zeros((), device=logits.device, dtype=torch.float64))
            total += value.detach().double() * len(labels)
        return loss

    def _micro_batch(self, i: int, batches: int, images: Tensor, labels: Tensor, epoch: int) -> Tensor:
        """Forward and backward of micro-batch ``i`` of ``batches``; the update when it is its group's last.

        Returns:
            The micro-batch's mean loss (with the weighted regulariser), not divided by its group's size.
        """
        # micro-batches i0 .. i0 + group - 1 make one update; the epoch's last group may be shorter
        accum_steps = self.config.accum_steps
        i0 = i - i % accum_steps
        group = min(accum_steps, batches - i0)
        update = i + 1 == i0 + group
        images = _images(images, self.ctx.device, self.config.channels_last)
        labels = labels.to(self.ctx.device, non_blocking=True)
        with self._no_sync(update):
            with self.autocast():
                logits = self.model(images)
                if i == 0:
                    _check_logits(logits, self.num_classes)
                loss = self._loss(images, logits, labels)
            if self.config.lambda_r and self.regulariser is not None:
                loss = loss + self.config.lambda_r * self.regulariser(self.module)
            scaled = loss / group  # the update's gradient: the mean over its micro-batches
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if update:
            self._step()
            if self.on_update is not None:
                self.on_update(epoch, self.num_updates)
        return loss

    def train_epoch(self, loader: Any, epoch: int, epochs: int) -> dict[str, float]:
        """Trains one epoch; returns global ``train_loss``, ``train_images``, ``train_seconds``, ``images_per_s``.

        With a :attr:`distiller` also the epoch's mean of each loss term: ``train_ce``, ``train_kd`` and, with
        ``distill_features``, ``train_feat`` (see :meth:`~sharify.train.distill.Distiller.loss`).

        ``images_per_s`` is over the whole epoch, data loading included, so one-time warm-up in the
        first epoch (``torch.compile`` compiling the model, cuDNN benchmarking) lowers that epoch's figure.
        """
        self.model.train()
        loss_sum = torch.zeros((), device=self.ctx.device, dtype=torch.float64)
        seen = 0
        batches = len(loader)
        bar = _progress(loader, f"epoch {epoch}/{epochs}", self.show_progress)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self._term_sums.clear()
        for i, (images, labels) in enumerate(bar):
            loss = self._micro_batch(i, batches, images, labels, epoch)
            loss_sum += loss.detach().double() * len(labels)
            seen += len(labels)
            if self.show_progress and (i % 10 == 0 or i + 1 == batches):
                rate = seen * self.ctx.world_size / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}", refresh=False)
        return self._epoch_totals(loss_sum, seen, start, epoch)

    def _epoch_totals(self, loss_sum: Tensor, seen: int, start: float, epoch: int) -> dict[str, float]:
        """The epoch's figures over all ranks (:meth:`train_epoch`); refuses a loss that is not finite."""
        device = self.ctx.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        names = list(self._term_sums)
        total_loss, total, *terms = all_reduce_sum(
            [float(loss_sum), float(seen), *(float(self._term_sums[k]) for k in names)], self.ctx
        )
        seconds = max(all_reduce_sum([seconds], self.ctx)[0] / self.ctx.world_size, 1e-9)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"training loss is {total_loss} in epoch {epoch}; lower --lr or use --amp bf16")
        return {
            "train_loss": total_loss / max(total, 1),
            "train_images": int(total),
            "train_seconds": seconds,
            "images_per_s": total / seconds,
            **{name: value / max(total, 1) for name, value in zip(names, terms)},
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
    bar = _progress(loader, desc, show_progress)
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
