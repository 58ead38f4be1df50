"""The state of a fine-tuning run: built once, carried through its passes, saved with every checkpoint.

:func:`build_state` places the model (device, memory format, activation checkpointing, SyncBatchNorm,
rank 0's weights on every rank) and builds what trains it -- loaders, optimizer, cosine schedule, grad
scaler, EMA, the frozen distillation teacher -- into one :class:`TrainingState`, which
:func:`~sharify.train.finetune` then hands from pass to pass. :func:`resume_state` restores a checkpoint
into it (weights, EMA, optimizer, schedule, scaler, RNG, metrics; never the teacher, which the caller
passes again); :meth:`TrainingState.checkpoint_state` is the inverse, what the next checkpoint saves
besides the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import FinetuneConfig
from .data import DataBundle
from .distill import place_teacher
from .distributed import DistContext, broadcast_from_main
from .loaders import Loaders, build_loaders
from .loop import autocast_context, evaluate, progress_shown, resolve_amp
from .optim import create_optimizer, create_scheduler
from .rng import seed_everything, set_rng_state

__all__ = ["TrainingState", "build_state", "resume_state"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """What a run is and where it stands: settings, paths, the model and what trains it, the history.

    Attributes:
        config: The run's settings.
        ctx: This process's place in the run.
        bundle: The data.
        out: The output directory.
        settings: ``config`` as JSON values (``config.json``, the checkpoints; compared on resume).
        setup: What the run trains on beyond the config (:func:`~sharify.train.resume.run_setup`).
        module: The bare model, on its device.
        teacher: The distillation teacher, placed (:func:`~sharify.train.distill.place_teacher`), or ``None``.
        loaders: Train and validation loaders of this process.
        optimizer: The optimizer.
        scheduler: The timm cosine schedule, stepped per update.
        scaler: The fp16 grad scaler, or ``None``.
        ema: A timm ``ModelEmaV3`` of ``module``, or ``None``.
        autocast: The factory of autocast contexts for the resolved ``config.amp``.
        params: The model's parameter count (``params`` in the metrics).
        checkpoint: The checkpoint resumed from, then the newest one written; ``None`` before the first.
        epoch: The last finished epoch (0 before the first).
        num_updates: Optimizer updates up to the end of ``epoch``.
        metrics: One record per evaluated epoch (``metrics.jsonl``), epoch 0 first with ``eval_before``.
    """

    config: FinetuneConfig
    ctx: DistContext
    bundle: DataBundle
    out: Path
    settings: dict[str, Any]
    setup: dict[str, Any]
    module: nn.Module
    loaders: Loaders
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    ema: Any
    autocast: Callable[[], AbstractContextManager[Any]]
    params: int
    teacher: nn.Module | None = None
    checkpoint: Path | None = None
    epoch: int = 0
    num_updates: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ema_module(self) -> nn.Module | None:
        """The EMA's model, or ``None`` without EMA."""
        return self.ema.module if self.ema is not None else None

    def evaluate(self, model: nn.Module, desc: str = "val") -> dict[str, float]:
        """``val_loss``, ``top1``, ``top5`` and ``val_images`` of ``model`` (``module`` or the EMA's) on all ranks."""
        return evaluate(
            model,
            self.loaders.val,
            self.ctx,
            autocast=self.autocast,
            channels_last=self.config.channels_last,
            num_classes=self.bundle.num_classes,
            show_progress=progress_shown(self.config, self.ctx),
            desc=desc,
        )

    def checkpoint_state(self, rngs: list[Any]) -> dict[str, Any]:
        """What a checkpoint saves besides the weights, with ``rngs`` the RNG states of all ranks."""
        return {
            "epoch": self.epoch,
            "num_updates": self.num_updates,
            "metrics": self.metrics,
            "rng": rngs,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "config": self.settings,
            "setup": self.setup,
        }


def place_model(module: nn.Module, config: FinetuneConfig, ctx: DistContext) -> nn.Module:
    """``module`` on the device, as ``config`` asks, with rank 0's weights; a SyncBatchNorm copy under DDP.

    Raises:
        ValueError: ``grad_checkpointing`` for a model without ``set_grad_checkpointing`` (not a timm model).
    """
    module.to(ctx.device)
    if config.channels_last:
        module.to(memory_format=torch.channels_last)
    if config.grad_checkpointing:
        if not hasattr(module, "set_grad_checkpointing"):
            raise ValueError(
                f"--grad-checkpointing needs a timm model; {type(module).__name__} has no set_grad_checkpointing"
            )
        module.set_grad_checkpointing(True)  # type: ignore[operator]
    if config.sync_bn and ctx.distributed:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    # every rank starts from rank 0's model (a head initialised independently on each rank would differ;
    # DDP syncs the weights only when it wraps the model, after the EMA copy and the first evaluation)
    broadcast_from_main([*module.parameters(), *module.buffers()], ctx)
    return module


def build_state(
    module: nn.Module,
    bundle: DataBundle,
    config: FinetuneConfig,
    ctx: DistContext,
    *,
    out: Path,
    settings: dict[str, Any],
    setup: dict[str, Any],
    checkpoint: Path | None,
    teacher: nn.Module | None = None,
) -> TrainingState:
    """Seeds this rank, places ``module`` (:func:`place_model`) and builds what trains it, at epoch 0.

    Args:
        module: The model to train.
        bundle: The data.
        config: The run's settings (validated).
        ctx: This process's place in the run.
        out: The output directory.
        settings: ``config`` as JSON values.
        setup: What the run trains on beyond the config.
        checkpoint: The checkpoint to resume from (:func:`resume_state`), or ``None``.
        teacher: The distillation teacher (``config.distill``), placed like the model but frozen, or ``None``.
    """
    seed_everything(config.seed + ctx.rank)
    module = place_model(module, config, ctx)
    loaders = build_loaders(
        bundle,
        module,
        ctx,
        batch_size=config.batch_size,
        workers=config.workers,
        seed=config.seed,
        image_size=config.image_size,
        augment=config.augment,
        eval_batch_size=config.eval_batch_size,
    )
    optimizer, scheduler = _optimization(module, config, len(loaders.train))
    amp = resolve_amp(config.amp, ctx.device)
    ema = None
    if config.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(module, decay=config.ema_decay)
    return TrainingState(
        config=config,
        ctx=ctx,
        bundle=bundle,
        out=out,
        settings=settings,
        setup=setup,
        module=module,
        loaders=loaders,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda") if amp == "fp16" else None,
        ema=ema,
        autocast=autocast_context(amp, ctx.device),
        params=sum(p.numel() for p in module.parameters()),
        teacher=place_teacher(teacher, config, ctx) if teacher is not None else None,
        checkpoint=checkpoint,
    )


def _optimization(module: nn.Module, config: FinetuneConfig, batches_per_epoch: int) -> tuple[Any, Any]:
    """The optimizer (timm's, shared-aware layer decay) and its warm-up + cosine schedule over the run's updates."""
    optimizer = create_optimizer(
        module,
        opt=config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        layer_decay=config.layer_decay,
    )
    updates_per_epoch = -(-batches_per_epoch // config.accum_steps)
    scheduler = create_scheduler(
        optimizer,
        total_updates=updates_per_epoch * config.epochs,
        min_lr=config.min_lr,
        warmup_updates=round(config.warmup_epochs * updates_per_epoch),
    )
    return optimizer, scheduler


def resume_state(state: TrainingState) -> None:
    """Restores ``state.checkpoint`` into ``state``: weights, EMA, optimizer, schedule, scaler, RNG, history.

    A larger ``epochs`` than the checkpoint's rebuilds the cosine schedule over the new length from the
    checkpoint's update on, as if the run had been started with it.
    """
    assert state.checkpoint is not None, "resume_state needs the checkpoint to resume from"
    config, ctx = state.config, state.ctx
    saved = load_checkpoint(state.checkpoint, state.module, ema=state.ema_module)
    state.optimizer.load_state_dict(saved["optimizer"])
    if saved.get("config", {}).get("epochs", config.epochs) == config.epochs:
        state.scheduler.load_state_dict(saved["scheduler"])
    else:  # --epochs grew: the cosine over the new length, from this update on (as if started with it)
        state.scheduler.step_update(num_updates=saved["num_updates"])
        logger.info("--epochs %d (was %s): schedule rebuilt", config.epochs, saved["config"]["epochs"])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.epoch, state.num_updates, state.metrics = saved["epoch"], saved["num_updates"], list(saved["metrics"])
    rngs = saved["rng"]
    if len(rngs) != ctx.world_size:
        logger.warning("resuming %d processes from a run of %d: RNG streams differ", ctx.world_size, len(rngs))
    set_rng_state(rngs[ctx.rank % len(rngs)])
