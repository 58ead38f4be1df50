"""The fine-tuning run: :func:`finetune` (Python) behind ``sharify finetune`` (command line).

A run trains a model -- sharified or not -- on a :class:`~sharify.train.data.DataBundle` and writes
into ``config.out``:

* ``report.json`` / ``report.md``: the parameter report, when the unshared ``original`` is given;
* ``metrics.jsonl``: one JSON line per epoch (``epoch``, ``train_loss``, ``val_loss``, ``top1``,
  ``top5``, ``ema_top1``/``ema_top5`` with EMA, ``lr``, ``images_per_s``, ``epoch_seconds``,
  ``params``; with ``distill`` also ``train_ce``, ``train_kd`` and ``train_feat``, the epoch's mean of
  each loss term); with ``eval_before`` an ``epoch: 0`` line holds the accuracy before any update (and,
  with ``distill``, the teacher's: ``teacher_top1``, ``teacher_top5``, ``teacher_val_loss``).
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
retention) and a larger ``epochs`` (:mod:`sharify.train.resume`); a distilling run must be given the
same teacher (a CRC-32 of its state_dict is saved with the setup). Under ``torchrun`` every
process calls :func:`finetune`; rank 0 logs and writes files. Every rank starts from rank 0's model
and, before each evaluation, takes rank 0's BatchNorm statistics and EMA weights, so the reduced
validation metrics are those of the model rank 0 saves.

A run is a sequence of passes over one :class:`~sharify.train.state.TrainingState`: *prepare* (check
the model, data and checkpoints; write ``config.json`` and the report), *build*
(:func:`~sharify.train.state.build_state`: the placed model, loaders, optimizer, schedule, scaler, EMA),
*resume* (:func:`~sharify.train.state.resume_state`) or *start* (BatchNorm recalibration, epoch 0),
the *epoch loop* (train, evaluate, checkpoint -- a finished epoch is saved before the next begins) and
*finish* (the final weights).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..layers import shared_groups
from ..rewrite.basis import BasisConv2d, orthogonality_loss
from .batchnorm import recalibrate_batchnorm
from .checkpoint import intact_checkpoint, latest_checkpoint, save_checkpoint
from .config import FinetuneConfig
from .data import DataBundle, load_data
from .distill import Distiller, check_teacher, frozen, teacher_fingerprint
from .distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    cleanup,
    ddp_static_graph,
    init_distributed,
    sync_from_main,
)
from .errors import CheckpointError, DataError
from .loop import Trainer
from .model import classifier
from .outputs import append_metrics, save_final, write_config, write_metrics, write_report
from .resume import check_resumable, config_settings, run_setup
from .rng import get_rng_state
from .state import TrainingState, build_state, resume_state

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


def finetune(
    model: nn.Module,
    data: DataBundle | str | Path,
    config: FinetuneConfig | None = None,
    *,
    original: nn.Module | None = None,
    teacher: nn.Module | None = None,
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
        teacher: With ``distill=True``, the model to distil from: normally ``original``, the unshared model with
            the weights ``model`` was made from (:mod:`sharify.train.distill`). It is moved to the device (in
            place) and runs in eval mode without gradients, never updated; its mode and ``requires_grad`` flags
            are restored at the end. Pass the same one again to ``resume``.
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
        ValueError: Bad settings, or ``out`` holds a run's checkpoints and ``resume`` is off; ``distill`` without
            a ``teacher`` or the reverse, or a teacher sharing parameters with ``model``.

    Example:
        >>> import sharify
        >>> from sharify.train import finetune, load_data, prepare_model
        >>> data = load_data("fashion-mnist", subset=256)  # doctest: +SKIP
        >>> original, shared = prepare_model("resnet18", num_classes=10, in_chans=1)  # doctest: +SKIP
        >>> result = finetune(shared, data, out="runs/demo", epochs=1, original=original)  # doctest: +SKIP
        >>> 0.0 <= result.final["top1"] <= 100.0  # doctest: +SKIP
        True
        >>> # or, taught by the unshared original as well: finetune(shared, data, teacher=original, distill=True)
    """
    config = replace(config or FinetuneConfig(), **overrides)
    config.validate()
    bundle = data if isinstance(data, DataBundle) else load_data(data)
    created_group = not torch.distributed.is_initialized()
    ctx = init_distributed(config.device)
    try:
        with frozen(teacher):
            return _run(model, bundle, config, ctx, _Models(original, teacher), on_update, setup or {})
    finally:
        if created_group:
            cleanup(ctx)


class _Models(NamedTuple):
    """The unshared models a run may be given besides the one it trains (see :func:`finetune`)."""

    original: nn.Module | None
    teacher: nn.Module | None


def _run(
    module: nn.Module,
    bundle: DataBundle,
    config: FinetuneConfig,
    ctx: DistContext,
    models: _Models,
    on_update: Callable[[int, int], None] | None,
    setup: Mapping[str, Any],
) -> FinetuneResult:
    """The passes of a run: prepare, build, resume or start, the epochs (then distillation hooks removed), finish."""
    prepared = _prepare(module, bundle, config, ctx, models, setup)
    state = build_state(
        module,
        bundle,
        config,
        ctx,
        out=prepared.out,
        settings=prepared.settings,
        setup=prepared.setup,
        checkpoint=prepared.checkpoint,
        teacher=models.teacher,
    )
    if config.resume:
        _resume(state)
    else:
        _start(state)
    trainer = _trainer(state, on_update)
    try:
        _train(state, trainer)
    finally:
        if trainer.distiller is not None:
            trainer.distiller.remove_hooks()
    return _finish(state)


class _Prepared(NamedTuple):
    """What :func:`_prepare` found: the output directory, the run's settings and setup, the checkpoint to resume."""

    out: Path
    settings: dict[str, Any]
    setup: dict[str, Any]
    checkpoint: Path | None


def _prepare(
    module: nn.Module,
    bundle: DataBundle,
    config: FinetuneConfig,
    ctx: DistContext,
    models: _Models,
    setup: Mapping[str, Any],
) -> _Prepared:
    """Checks the model, data and checkpoints before anything is built; rank 0 writes ``config.json`` and the report.

    Raises:
        DataError: The classifier does not fit the data's classes.
        ValueError: ``lambda_r`` without filter bases; a teacher that cannot teach (:func:`check_teacher`);
            checkpoints in ``out`` without ``resume``; ``out`` not creatable.
        CheckpointError: ``resume`` without a (intact) checkpoint, or with other settings than it was saved with.
    """
    _check_model(module, bundle, config)
    check_teacher(module, models.teacher, config)
    out = Path(config.out)
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
    if models.teacher is not None:  # resume must be taught by the same teacher
        described["teacher"] = teacher_fingerprint(models.teacher)
    if existing is not None:
        check_resumable(existing, settings, described)
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent is a file, no permission, read-only file system ...
            raise ValueError(
                f"cannot create the output directory {out} ({exc.strerror or exc}); pass another --out"
            ) from exc
        write_config(out, settings, described)
        if models.original is not None and shared_groups(module):
            write_report(out, models.original, module)
    return _Prepared(out, settings, described, existing)


def _check_model(module: nn.Module, bundle: DataBundle, config: FinetuneConfig) -> None:
    """Refuses a classifier of another size than the data's classes, and ``lambda_r`` without filter bases."""
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


def _resume(state: TrainingState) -> None:
    """Continues from ``state.checkpoint`` (:func:`~sharify.train.state.resume_state`); rewrites ``metrics.jsonl``."""
    resume_state(state)
    if state.ctx.is_main:
        write_metrics(state.out / "metrics.jsonl", state.metrics)
        logger.info("resumed from %s (epoch %d, %d updates)", state.checkpoint, state.epoch, state.num_updates)


def _start(state: TrainingState) -> None:
    """Starts a new run: an empty ``metrics.jsonl``, BatchNorm recalibration and the epoch-0 evaluation if asked."""
    config, ctx = state.config, state.ctx
    if ctx.is_main:
        write_metrics(state.out / "metrics.jsonl", [])
    if config.bn_recalibrate:
        _recalibrate(state)
    if config.eval_before:
        first = {"epoch": 0, **state.evaluate(state.module), "params": state.params}
        if state.teacher is not None:
            taught = state.evaluate(state.teacher, desc="val (teacher)")
            first.update({f"teacher_{k}": taught[k] for k in ("top1", "top5", "val_loss")})
        state.metrics.append(first)
        if ctx.is_main:
            append_metrics(state.out / "metrics.jsonl", first)
            logger.info("epoch 0 (before training): top1 %.2f%%, val loss %.4f", first["top1"], first["val_loss"])


def _recalibrate(state: TrainingState) -> None:
    """Re-estimates the BatchNorm statistics on ``config.bn_recalibrate`` training images; the EMA copies them."""
    config, bundle = state.config, state.bundle
    if config.bn_recalibrate > len(bundle.train):  # type: ignore[arg-type]
        logger.warning(
            "--bn-recalibrate %d: the data has %d training images; all of them are used",
            config.bn_recalibrate,
            len(bundle.train),  # type: ignore[arg-type]
        )
    state.loaders.set_epoch(0, config.seed)
    recalibrate_batchnorm(
        state.module,
        state.loaders.train,
        num_images=config.bn_recalibrate,
        device=state.ctx.device,
        channels_last=config.channels_last,
        autocast=state.autocast(),
    )
    if state.ema is not None:
        state.ema.module.load_state_dict(state.module.state_dict())


def _trainer(state: TrainingState, on_update: Callable[[int, int], None] | None) -> Trainer:
    """The :class:`~sharify.train.loop.Trainer` of ``state``, its model wrapped in DDP and compiled as asked.

    DDP wraps the model only now, after the EMA copy and the first evaluation: it syncs the weights when it
    wraps, and every rank already holds rank 0's. The teacher's :class:`~sharify.train.distill.Distiller` hooks
    the stages before the model is compiled; the teacher is not wrapped (each rank runs its own copy).
    """
    config, ctx, module = state.config, state.ctx, state.module
    distiller = Distiller(module, state.teacher, config) if state.teacher is not None else None
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
    return Trainer(
        model=train_model,
        module=module,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        ctx=ctx,
        config=config,
        scaler=state.scaler,
        ema=state.ema,
        regulariser=orthogonality_loss,
        num_classes=state.bundle.num_classes,
        num_updates=state.num_updates,
        on_update=on_update,
        distiller=distiller,
    )


def _train(state: TrainingState, trainer: Trainer) -> None:
    """The epoch loop: each epoch trains, evaluates and is saved (:func:`_save_epoch`) before the next begins."""
    for epoch in range(state.epoch + 1, state.config.epochs + 1):
        record = _epoch(state, trainer, epoch)
        state.metrics.append(record)
        state.epoch, state.num_updates = epoch, trainer.num_updates
        _save_epoch(state, record)
        barrier(state.ctx)


def _epoch(state: TrainingState, trainer: Trainer, epoch: int) -> dict[str, Any]:
    """Trains and evaluates one epoch (the model and its EMA, as rank 0 holds them); returns its metrics record."""
    tic = time.perf_counter()
    state.loaders.set_epoch(epoch, state.config.seed)
    record: dict[str, Any] = {"epoch": epoch, **trainer.train_epoch(state.loaders.train, epoch, state.config.epochs)}
    sync_from_main(state.module, state.ema_module, state.ctx)  # all ranks evaluate what rank 0 saves
    record.update(state.evaluate(state.module))
    if state.ema is not None:
        ema_metrics = state.evaluate(state.ema.module, desc="val (EMA)")
        record.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"], ema_val_loss=ema_metrics["val_loss"])
    record.update(
        lr=max(g["lr"] for g in state.optimizer.param_groups),
        updates=trainer.num_updates,
        params=state.params,
        epoch_seconds=time.perf_counter() - tic,
    )
    return record


def _save_epoch(state: TrainingState, record: dict[str, Any]) -> None:
    """Saves the finished epoch: rank 0 writes its checkpoint (atomically) and its ``metrics.jsonl`` line.

    Every rank takes part: the checkpoint holds the RNG states of all of them.
    """
    rngs = all_gather_objects(get_rng_state(), state.ctx)
    if not state.ctx.is_main:
        return
    config = state.config
    state.checkpoint = save_checkpoint(
        state.out,
        state.epoch,
        state.module.state_dict(),
        state.checkpoint_state(rngs),
        keep=config.keep_checkpoints,
        ema_state=state.ema.module.state_dict() if state.ema is not None else None,
    )
    append_metrics(state.out / "metrics.jsonl", record)
    logger.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f, top1 %.2f%%, top5 %.2f%%, %.0f img/s, %.1fs",
        state.epoch,
        config.epochs,
        record["train_loss"],
        record["val_loss"],
        record["top1"],
        record["top5"],
        record["images_per_s"],
        record["epoch_seconds"],
    )


def _finish(state: TrainingState) -> FinetuneResult:
    """Rank 0 writes the final weights (and the EMA's) with the sharing recipe; all ranks return the result."""
    if state.ctx.is_main:
        save_final(state.out, state.module, state.ema_module, state.config.epochs)
    barrier(state.ctx)
    return FinetuneResult(state.module, state.metrics, state.out, state.ema_module, state.checkpoint)
