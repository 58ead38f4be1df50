"""The settings of a fine-tuning run: :class:`FinetuneConfig` (one field per ``sharify finetune`` option)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

__all__ = ["FinetuneConfig"]


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (the ``sharify finetune`` options of the same names).

    Attributes:
        out: Output directory (metrics, report, checkpoints, final weights).
        epochs: Training epochs.
        batch_size: Images per process and micro-batch (global batch = ``batch_size * world * accum_steps``).
        eval_batch_size: Evaluation batch size (default ``2 * batch_size``).
        opt: Any timm optimizer name (``sgd``, ``adamw``, ...).
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: Weight decay of conv/linear weights (1-d tensors get none).
        layer_decay: Layer-wise lr decay factor (shared tensors get their first member's layer).
        warmup_epochs: Linear warm-up length in epochs (fractions allowed); cosine decay afterwards.
        min_lr: Final learning rate of the cosine schedule.
        label_smoothing: Cross-entropy label smoothing.
        accum_steps: Micro-batches per optimizer update (gradient accumulation); each update's gradient is
            the mean over its micro-batches, also in an epoch's last, shorter update.
        clip_grad: Max gradient norm, or ``None``.
        amp: ``"auto"`` (bf16 on CUDA devices that support it, else fp32), ``"none"``, ``"bf16"`` or ``"fp16"``
            (CUDA only; fp16 with a grad scaler).
        channels_last: Train in channels-last memory format.
        compile: Wrap the model in ``torch.compile``.
        grad_checkpointing: timm ``set_grad_checkpointing``; under DDP with re-entrant checkpointing
            (``timm.layers.set_reentrant_ckpt(True)``) the model is wrapped with ``static_graph=True``, and
            gradient accumulation then reduces every micro-batch (timm's default, non-reentrant, needs neither).
        ema_decay: Keep a timm ``ModelEmaV3`` with this decay, or ``None``.
        bn_recalibrate: Before training, re-estimate BatchNorm statistics on this many images (0: off).
        lambda_r: Weight of ``sharify.orthogonality_loss`` (filter-basis models; needs that function).
        distill: Distil from a teacher (:func:`~sharify.train.finetune`'s ``teacher``; ``sharify finetune``: the
            unshared original the shared model was made from): the loss becomes
            ``(1 - distill_weight) * CE + distill_weight * T**2 * KL(softmax(teacher / T) || softmax(student / T))``
            (Hinton et al., 2015), ``T = distill_temperature``, plus the stage term of ``distill_features``.
            Costs one forward of the teacher per micro-batch (no backward).
        distill_temperature: Softmax temperature ``T`` of the distillation term (> 0; 4, the common CIFAR
            setting of Tian et al., ICLR 2020, is the default).
        distill_weight: Weight ``alpha`` in [0, 1] of the distillation term; the cross-entropy with the labels
            gets ``1 - alpha``. The default 0.9 is Tian et al.'s (``0.1 * CE + 0.9 * KD``). ``0`` trains on the
            labels alone and only logs the distance to the teacher (``train_kd``).
        distill_features: Also match the output of every residual stage that holds a shared group (the
            ``stage`` of each holder, e.g. ``layer1``..``layer4`` of a ResNet): the mean over those stages of
            the mean squared difference between student and teacher outputs, weighted by
            ``distill_feature_weight`` and added to the loss.
        distill_feature_weight: Weight of the stage term of ``distill_features`` (>= 0).
        sync_bn: Convert BatchNorm to SyncBatchNorm under DDP (CUDA devices only; refused elsewhere).
        image_size: Input size (default: native size of small images, else the model's data config).
        augment: Random crop/flip (small images) or timm's train transform; off for exact comparisons.
        workers: DataLoader worker processes.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        seed: Seed of shuffling, augmentation and model randomness (per rank: ``seed + rank``); in [0, 2**32).
            ``sharify finetune`` also seeds the model's construction with it, so the same command gives the
            same weights.
        eval_before: Evaluate before the first update and log it as epoch 0.
        resume: Continue from the newest checkpoint in ``out``; the other settings must be those of the
            run that wrote it, except :attr:`RESUME_MAY_CHANGE` and a larger ``epochs``.
        resume_fallback: With ``resume``, when the newest checkpoint fails its checksums, resume from the
            newest intact one (a warning names the corrupt one); off: a corrupt checkpoint is refused.
        keep_checkpoints: Checkpoints to keep (newest first).
        quiet: No progress bars.
    """

    #: Settings that ``resume`` may change: they affect speed, memory, logging or which files are kept,
    #: not what is trained. ``epochs`` may grow (the schedule is rebuilt); any other difference from
    #: the checkpoint's settings is refused.
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset(
        {
            "out",
            "resume",
            "resume_fallback",
            "workers",
            "quiet",
            "keep_checkpoints",
            "device",
            "compile",
            "channels_last",
            "grad_checkpointing",
            "eval_batch_size",
        }
    )

    out: str | Path = "runs/finetune"
    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int | None = None
    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    layer_decay: float | None = None
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    accum_steps: int = 1
    clip_grad: float | None = None
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    ema_decay: float | None = None
    bn_recalibrate: int = 0
    lambda_r: float = 0.0
    distill: bool = False
    distill_temperature: float = 4.0
    distill_weight: float = 0.9
    distill_features: bool = False
    distill_feature_weight: float = 1.0
    sync_bn: bool = False
    image_size: int | None = None
    augment: bool = True
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    eval_before: bool = False
    resume: bool = False
    resume_fallback: bool = False
    keep_checkpoints: int = 1
    quiet: bool = False

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad setting (e.g. ``sync_bn`` without CUDA, ``out`` a file)."""
        for name in ("epochs", "batch_size", "accum_steps", "keep_checkpoints", "eval_batch_size", "image_size"):
            _check(name, getattr(self, name), lambda v: v >= 1, ">= 1")
        for name in ("lr", "clip_grad"):
            _check(name, getattr(self, name), lambda v: v > 0, "> 0")
        for name in ("warmup_epochs", "bn_recalibrate", "workers", "weight_decay", "min_lr", "lambda_r", "momentum"):
            _check(name, getattr(self, name), lambda v: v >= 0, ">= 0")
        _check("label_smoothing", self.label_smoothing, lambda v: 0 <= v < 1, "in [0, 1)")
        _check("layer_decay", self.layer_decay, lambda v: 0 < v <= 1, "in (0, 1]")
        _check("ema", self.ema_decay, lambda v: 0 < v < 1, "a decay in (0, 1)")
        _check("seed", self.seed, lambda v: 0 <= v < 2**32, "in [0, 2**32)")
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"--warmup-epochs {self.warmup_epochs} exceeds --epochs {self.epochs}: the learning rate would never "
                "reach --lr; shorten the warm-up"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}; the schedule decays from --lr to it")
        self._validate_distill()
        if self.resume_fallback and not self.resume:
            raise ValueError("--resume-fallback chooses the checkpoint --resume continues from; pass --resume too")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; pass a directory for the run's outputs (created if missing)")
        from .distributed import resolve_device
        from .loop import resolve_amp

        device = resolve_device(self.device)
        resolve_amp(self.amp, device)
        if self.sync_bn and device.type != "cuda":
            raise ValueError(
                f"--sync-bn needs CUDA devices (SyncBatchNorm synchronises over NCCL), not --device {self.device} "
                "here; drop --sync-bn on CPU, where each process keeps its own BatchNorm statistics"
            )

    def _validate_distill(self) -> None:
        """Refuses bad distillation settings, and distillation settings that would do nothing."""
        _check("distill_temperature", self.distill_temperature, lambda v: v > 0, "> 0")
        _check("distill_weight", self.distill_weight, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check("distill_feature_weight", self.distill_feature_weight, lambda v: v >= 0, ">= 0")
        defaults = {f.name: f.default for f in fields(self)}
        needs = {"distill_temperature": "distill", "distill_weight": "distill", "distill_features": "distill"}
        needs["distill_feature_weight"] = "distill_features"
        for name, needed in needs.items():
            if getattr(self, name) != defaults[name] and not getattr(self, needed):
                flag, needed_flag = (f"--{n.replace('_', '-')}" for n in (name, needed))
                raise ValueError(f"{flag} has no effect without {needed_flag}; pass {needed_flag} or drop {flag}")


def _check(name: str, value: float | None, ok: Callable[[float], bool], wanted: str) -> None:
    """Refuses ``value`` of setting ``name`` (unless ``None``) when it is not finite or not ``ok``."""
    if value is not None and not (math.isfinite(value) and ok(value)):
        raise ValueError(f"--{name.replace('_', '-')} must be {wanted}, got {value}")
