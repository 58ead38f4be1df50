"""The fine-tuning run: :func:`finetune` (Python) behind ``sharify finetune`` (command line).

A run trains a model -- sharified or not -- on a :class:`~sharify.train.data.DataBundle` and writes
into ``config.out``:

* ``report.json`` / ``report.md``: the parameter report, when the unshared ``original`` is given;
* ``metrics.jsonl``: one JSON line per epoch (``epoch``, ``train_loss``, ``val_loss``, ``top1``,
  ``top5``, ``ema_top1``/``ema_top5`` with EMA, ``lr``, ``images_per_s``, ``epoch_seconds``,
  ``params``); with ``eval_before`` an ``epoch: 0`` line holds the accuracy before any update.
  ``images_per_s`` counts the training images of all ranks over the epoch's training time (data
  loading included, evaluation not); the first epoch's also includes one-time warm-up --
  ``torch.compile`` compiling the model, cuDNN autotuning -- so compare later epochs for speed;
* ``checkpoints/epoch-NNNN/``: the ``keep_checkpoints`` newest complete epochs (weights as safetensors,
  training state in ``state.json`` and, for the tensors of optimizer and RNG, ``state.pt``; see
  :mod:`sharify.train.checkpoint`);
* ``model.safetensors`` (and ``model_ema.safetensors``): the final weights, written by
  :func:`sharify.save` with the sharing recipe in the header, so ``sharify.load(path)`` (or
  ``sharify.load(path, model=...)`` for a model of your own) rebuilds the trained model, and
  ``load_state_dict`` into an identically sharified model restores it exactly.

With ``resume=True`` the run continues after the newest checkpoint (whose checksums must verify; with
``resume_fallback=True`` a corrupt one is skipped for the newest intact one) with the same optimizer,
schedule, grad scaler, EMA, RNG and metrics as if it had never stopped. The settings must be the
checkpoint's, except those of :attr:`FinetuneConfig.RESUME_MAY_CHANGE` (speed, memory, logging,
retention) and a larger ``epochs`` (:mod:`sharify.train.resume`). Under ``torchrun`` every
process calls :func:`finetune`; rank 0 logs and writes files. Every rank starts from rank 0's model
and, before each evaluation, takes rank 0's BatchNorm statistics and EMA weights, so the reduced
validation metrics are those of the model rank 0 saves.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.serialization import save
from ..layers import shared_groups
from ..report import report
from ..rewrite.basis import BasisConv2d, orthogonality_loss
from .batchnorm import recalibrate_batchnorm
from .checkpoint import (
    atomic_write,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    writing,
)
from .config import FinetuneConfig
from .data import DataBundle, load_data
from .distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_from_main,
    cleanup,
    ddp_static_graph,
    init_distributed,
    sync_from_main,
)
from .errors import CheckpointError, DataError
from .loaders import build_loaders
from .loop import Trainer, autocast_context, evaluate, resolve_amp
from .model import classifier
from .optim import create_optimizer, create_scheduler
from .resume import check_resumable, config_settings, run_setup
from .rng import get_rng_state, seed_everything, set_rng_state

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model (on its device), the EMA model and the metrics."""

    model: nn.Module
    metrics: list[dict[str, Any]]
    out: Path
    ema_model: nn.Module | None = None
    checkpoint: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics."""
        return self.metrics[-1] if self.metrics else {}


def _write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _write_report(out: Path, original: nn.Module, module: nn.Module) -> None:
    result = report(original, module)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n"))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(result.to_markdown() + "\n"))


def finetune(
    model: nn.Module,
    data: DataBundle | str | Path,
    config: FinetuneConfig | None = None,
    *,
    original: nn.Module | None = None,
    on_update: Callable[[int, int], None] | None = None,
    setup: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tunes ``model`` on ``data``; see the module docstring for what is written to ``config.out``.

    Args:
        model: The model to train (sharified or not); it is trained in place and moved to the device.
        data: A :class:`DataBundle` (see :func:`sharify.train.load_data`) or a spec for ``load_data``.
        config: Run settings; ``overrides`` replace single fields (``finetune(m, d, epochs=2, out=...)``).
        original: The unshared model ``model`` was made from; enables ``report.json``/``report.md``.
        on_update: Called as ``on_update(epoch, num_updates)`` after every optimizer update.
        setup: How the caller made the model and data (``sharify finetune`` passes its model, data and
            sharing options); JSON-able values. Saved in ``config.json`` and the checkpoints with what
            :func:`finetune` sees itself (data source and sizes, processes), and compared on ``resume``
            like the settings.

    Returns:
        The trained model, per-epoch metrics and the output directory.

    Raises:
        DataError: The data does not fit the model (class count, channels).
        CheckpointError: ``resume`` with a missing, corrupt or mismatching checkpoint, or with settings
            that differ from those of the run that wrote it (see the module docstring).
        ValueError: Bad settings, or ``out`` holds a run's checkpoints and ``resume`` is off.

    Example:
        >>> import sharify
        >>> from sharify.train import finetune, load_data, prepare_model
        >>> data = load_data("fashion-mnist", subset=256)  # doctest: +SKIP
        >>> original, shared = prepare_model("resnet18", num_classes=10, in_chans=1)  # doctest: +SKIP
        >>> result = finetune(shared, data, out="runs/demo", epochs=1, original=original)  # doctest: +SKIP
        >>> 0.0 <= result.final["top1"] <= 100.0  # doctest: +SKIP
        True
    """
    config = replace(config or FinetuneConfig(), **overrides)
    config.validate()
    bundle = data if isinstance(data, DataBundle) else load_data(data)
    created_group = not torch.distributed.is_initialized()
    ctx = init_distributed(config.device)
    try:
        return _run(model, bundle, config, ctx, original, on_update, setup or {})
    finally:
        if created_group:
            cleanup(ctx)


def _run(
    module: nn.Module,
    bundle: DataBundle,
    config: FinetuneConfig,
    ctx: DistContext,
    original: nn.Module | None,
    on_update: Callable[[int, int], None] | None,
    setup: Mapping[str, Any],
) -> FinetuneResult:
    out = Path(config.out)
    amp = resolve_amp(config.amp, ctx.device)
    autocast = autocast_context(amp, ctx.device)
    show = ctx.is_main and not config.quiet and sys.stderr.isatty()
    found = classifier(module)
    if found is not None and found[1].out_features != bundle.num_classes:
        raise DataError(
            f"the model's classifier `{found[0]}` has {found[1].out_features} outputs but "
            f"{bundle.source or bundle.name} has {bundle.num_classes} classes; "
            f"pass --num-classes {bundle.num_classes} to replace the head"
        )
    if config.lambda_r and not any(isinstance(m, BasisConv2d) for m in module.modules()):
        raise ValueError(
            f"--lambda-r {config.lambda_r} weighs the orthogonality of filter bases, but the model has none "
            "(it would add nothing); drop --lambda-r, or share with --method basis"
        )
    existing = intact_checkpoint(out, fallback=config.resume_fallback) if config.resume else latest_checkpoint(out)
    if existing is not None and not config.resume:
        raise ValueError(
            f"{out} already holds checkpoints ({existing.name}); pass --resume to continue, or another --out"
        )
    if config.resume and existing is None:
        raise CheckpointError(
            f"--resume: {out} holds no complete checkpoint (none is written before the first epoch ends); "
            "start the run without --resume"
        )
    settings, described = config_settings(config), run_setup(bundle, ctx, setup)
    if existing is not None:
        check_resumable(existing, settings, described)
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent is a file, no permission, read-only file system ...
            raise ValueError(
                f"cannot create the output directory {out} ({exc.strerror or exc}); pass another --out"
            ) from exc
        text = json.dumps({**settings, "setup": described}, indent=2) + "\n"
        atomic_write(out / "config.json", lambda tmp: tmp.write_text(text))
        if original is not None and shared_groups(module):
            _write_report(out, original, module)

    seed_everything(config.seed + ctx.rank)
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
    optimizer = create_optimizer(
        module,
        opt=config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        layer_decay=config.layer_decay,
    )
    updates_per_epoch = -(-len(loaders.train) // config.accum_steps)
    scheduler = create_scheduler(
        optimizer,
        total_updates=updates_per_epoch * config.epochs,
        min_lr=config.min_lr,
        warmup_updates=round(config.warmup_epochs * updates_per_epoch),
    )
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    ema = None
    if config.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(module, decay=config.ema_decay)
    params = sum(p.numel() for p in module.parameters())
    evaluate_kw: dict[str, Any] = {
        "autocast": autocast,
        "channels_last": config.channels_last,
        "num_classes": bundle.num_classes,
        "show_progress": show,
    }

    metrics: list[dict[str, Any]] = []
    start_epoch, num_updates = 1, 0
    if config.resume:
        assert existing is not None
        state = load_checkpoint(existing, module, ema=ema.module if ema is not None else None)
        optimizer.load_state_dict(state["optimizer"])
        if state.get("config", {}).get("epochs", config.epochs) == config.epochs:
            scheduler.load_state_dict(state["scheduler"])
        else:  # --epochs grew: the cosine over the new length, from this update on (as if started with it)
            scheduler.step_update(num_updates=state["num_updates"])
            logger.info("--epochs %d (was %s): schedule rebuilt", config.epochs, state["config"]["epochs"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, num_updates, metrics = state["epoch"] + 1, state["num_updates"], list(state["metrics"])
        rngs = state["rng"]
        if len(rngs) != ctx.world_size:
            logger.warning("resuming %d processes from a run of %d: RNG streams differ", ctx.world_size, len(rngs))
        set_rng_state(rngs[ctx.rank % len(rngs)])
        if ctx.is_main:
            _write_metrics(out / "metrics.jsonl", metrics)
            logger.info("resumed from %s (epoch %d, %d updates)", existing, state["epoch"], num_updates)
    else:
        if ctx.is_main:
            _write_metrics(out / "metrics.jsonl", [])
        if config.bn_recalibrate:
            if config.bn_recalibrate > len(bundle.train):  # type: ignore[arg-type]
                logger.warning(
                    "--bn-recalibrate %d: the data has %d training images; all of them are used",
                    config.bn_recalibrate,
                    len(bundle.train),  # type: ignore[arg-type]
                )
            loaders.set_epoch(0, config.seed)
            recalibrate_batchnorm(
                module,
                loaders.train,
                num_images=config.bn_recalibrate,
                device=ctx.device,
                channels_last=config.channels_last,
                autocast=autocast(),
            )
            if ema is not None:
                ema.module.load_state_dict(module.state_dict())
        if config.eval_before:
            first = {"epoch": 0, **evaluate(module, loaders.val, ctx, **evaluate_kw), "params": params}
            metrics.append(first)
            if ctx.is_main:
                _append_metrics(out / "metrics.jsonl", first)
                logger.info("epoch 0 (before training): top1 %.2f%%, val loss %.4f", first["top1"], first["val_loss"])

    train_model: nn.Module = module
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(
            module,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            static_graph=ddp_static_graph(config.grad_checkpointing),
        )
    if config.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    trainer = Trainer(
        model=train_model,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        ctx=ctx,
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        autocast=autocast,
        scaler=scaler,
        ema=ema,
        accum_steps=config.accum_steps,
        clip_grad=config.clip_grad,
        channels_last=config.channels_last,
        lambda_r=config.lambda_r,
        regulariser=orthogonality_loss,
        num_classes=bundle.num_classes,
        num_updates=num_updates,
        on_update=on_update,
        show_progress=show,
    )

    last_dir = existing
    for epoch in range(start_epoch, config.epochs + 1):
        tic = time.perf_counter()
        loaders.set_epoch(epoch, config.seed)
        record: dict[str, Any] = {"epoch": epoch, **trainer.train_epoch(loaders.train, epoch, config.epochs)}
        sync_from_main(module, ema.module if ema is not None else None, ctx)  # all ranks evaluate what rank 0 saves
        record.update(evaluate(module, loaders.val, ctx, **evaluate_kw))
        if ema is not None:
            ema_metrics = evaluate(ema.module, loaders.val, ctx, **evaluate_kw, desc="val (EMA)")
            record.update(
                ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"], ema_val_loss=ema_metrics["val_loss"]
            )
        record.update(
            lr=max(g["lr"] for g in optimizer.param_groups),
            updates=trainer.num_updates,
            params=params,
            epoch_seconds=time.perf_counter() - tic,
        )
        metrics.append(record)
        rngs = all_gather_objects(get_rng_state(), ctx)
        if ctx.is_main:
            state = {
                "epoch": epoch,
                "num_updates": trainer.num_updates,
                "metrics": metrics,
                "rng": rngs,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "config": settings,
                "setup": described,
            }
            last_dir = save_checkpoint(
                out,
                epoch,
                module.state_dict(),
                state,
                keep=config.keep_checkpoints,
                ema_state=ema.module.state_dict() if ema is not None else None,
            )
            _append_metrics(out / "metrics.jsonl", record)
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, top1 %.2f%%, top5 %.2f%%, %.0f img/s, %.1fs",
                epoch,
                config.epochs,
                record["train_loss"],
                record["val_loss"],
                record["top1"],
                record["top5"],
                record["images_per_s"],
                record["epoch_seconds"],
            )
        barrier(ctx)

    if ctx.is_main:
        # sharify.save: atomic, and the recipe in the header lets sharify.load(path) rebuild the model
        meta = {"sharify-finetune-epochs": str(config.epochs)}
        with writing(out / "model.safetensors"):
            save(module, out / "model.safetensors", metadata=meta)
        if ema is not None:
            with writing(out / "model_ema.safetensors"):
                save(ema.module, out / "model_ema.safetensors", metadata=meta)
    barrier(ctx)
    return FinetuneResult(module, metrics, out, ema.module if ema is not None else None, last_dir)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    import os

    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
