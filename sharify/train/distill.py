"""Distillation from the original: the unshared model teaches the shared one during fine-tuning.

Sharing turns a trained network into a smaller one that starts close to it; the original knows more
than the labels say (which wrong classes are close), so fine-tuning can learn from its outputs as well
as from the labels (Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015; the conversions
of pretrained networks into shared ones -- Relaxed Recursive Transformers, Bae et al., ICLR 2025,
DeltaLLM, 2025 -- do the same). With ``FinetuneConfig(distill=True)`` each micro-batch's loss is

    ``(1 - alpha) * CE(student, labels) + alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))``

(:func:`distillation_loss`; the ``T**2`` keeps the gradient's scale independent of ``T``), plus, with
``distill_features``, ``beta`` times the mean over the residual stages holding shared groups of the mean
squared difference between the stages' outputs (FitNets' hint loss, Romero et al., ICLR 2015, at every
stage). The stages are read from the sharified model's holders (:func:`stage_paths`), and both models'
stage modules are hooked by path.

The teacher (:func:`place_teacher`) runs in eval mode without gradients (:func:`frozen`; its mode and
``requires_grad`` flags are restored when the run ends), on the student's device, in its memory format
and under the same autocast; it is never updated, never in the optimizer, the EMA or a checkpoint, and
never wrapped in DDP: each process holds its own copy (rank 0's weights). With ``compile`` it is compiled
too (an inference graph, compiled once).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import scoped_key, shared_stores
from .config import FinetuneConfig
from .distributed import DistContext, broadcast_from_main

__all__ = [
    "DistillLoss",
    "Distiller",
    "check_teacher",
    "distillation_loss",
    "frozen",
    "place_teacher",
    "stage_paths",
    "teacher_fingerprint",
]


class DistillLoss(NamedTuple):
    """The terms of :func:`distillation_loss`: ``total = (1 - weight) * ce + weight * kd``."""

    total: Tensor
    ce: Tensor
    kd: Tensor


def distillation_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    *,
    temperature: float = 4.0,
    weight: float = 0.9,
    label_smoothing: float = 0.0,
) -> DistillLoss:
    """Hinton et al.'s distillation loss of ``student`` logits against ``teacher`` logits and the labels.

    Args:
        student: Logits of the model being trained, ``(batch, classes)``.
        teacher: Logits of the teacher for the same images (no gradient flows into them).
        labels: Class indices, ``(batch,)``.
        temperature: Softmax temperature ``T`` (> 0).
        weight: ``alpha`` in [0, 1]: the weight of the distillation term; the cross-entropy gets ``1 - alpha``.
        label_smoothing: Label smoothing of the cross-entropy term.

    Returns:
        ``total``, the cross-entropy ``ce`` with the labels and ``kd = T**2 * KL(p_teacher || p_student)`` with
        ``p = softmax(logits / T)``, averaged over the batch; all in float32.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> terms = distillation_loss(logits, logits, torch.tensor([0]), weight=1.0)
        >>> float(terms.kd), float(terms.total)
        (0.0, 0.0)
    """
    student, teacher = student.float(), teacher.detach().float()
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    kd = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    return DistillLoss((1 - weight) * ce + weight * kd, ce, kd)


def stage_paths(model: nn.Module) -> list[str]:
    """The module paths of the residual stages that hold ``model``'s shared groups, in the order of the groups.

    Each holder records its stage (``layer1`` of a ResNet, ``stages.0`` of a timm model); a store of a
    submodule sharified in place prefixes its path (``backbone.body.layer1``). Empty for an unshared model.
    """
    paths: list[str] = []
    for scope, store in shared_stores(model).items():
        for holder in store.holders().values():
            path = scoped_key(scope, holder.stage)
            if holder.stage and path not in paths:
                paths.append(path)
    return paths


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A CRC-32 of the teacher's state_dict (names, shapes, dtypes, bytes): ``resume`` refuses another teacher."""
    crc = 0
    for name, tensor in teacher.state_dict().items():
        crc = zlib.crc32(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode(), crc)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        crc = zlib.crc32(data.numpy().tobytes(), crc)
    return f"crc32:{crc:08x}"


def check_teacher(model: nn.Module, teacher: nn.Module | None, config: FinetuneConfig) -> None:
    """Refuses a teacher that cannot teach ``model`` under ``config``, before anything is built.

    Raises:
        ValueError: ``distill`` without a teacher or a teacher without ``distill``; a teacher that shares
            parameters with ``model`` (it would be trained, or frozen with it); ``distill_features`` on a
            model without shared stages, or a teacher without a module at one of their paths.
    """
    if teacher is None:
        if config.distill:
            raise ValueError("--distill needs a teacher: finetune(model, data, teacher=original, distill=True)")
        return
    if not config.distill:
        raise ValueError("a teacher is used only with distill=True (--distill); pass distill=True or drop teacher")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module (the unshared original), got {type(teacher).__name__}")
    own = {id(p) for p in model.parameters()}
    if any(id(p) in own for p in teacher.parameters()):
        raise ValueError(
            "--distill: the teacher shares parameters with the model being trained (with --no-sharify the model "
            "is the original itself); distil a sharified model from the unshared original it was made from"
        )
    if config.distill_features:
        stages = stage_paths(model)
        if not stages:
            raise ValueError(
                "--distill-features matches the outputs of the stages that hold shared groups, but the model has "
                "no shared groups; sharify it, or drop --distill-features"
            )
        for path in stages:
            try:
                teacher.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"--distill-features: the teacher has no module `{path}` (a stage of the model); pass the "
                    "unshared original the model was made from"
                ) from None


@contextmanager
def frozen(teacher: nn.Module | None) -> Iterator[None]:
    """``teacher`` in eval mode with ``requires_grad`` off inside the block; its mode and flags restored after.

    A no-op for ``None``. Restoring matters to the caller's unshared original: sharifying it again after a
    distilling run must give a trainable copy.
    """
    if not isinstance(teacher, nn.Module):  # None, or a bad value check_teacher names
        yield
        return
    was_training = teacher.training
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher.eval().requires_grad_(False)
    try:
        yield
    finally:
        teacher.train(was_training)
        for param, flag in flags:
            param.requires_grad_(flag)


def place_teacher(teacher: nn.Module, config: FinetuneConfig, ctx: DistContext) -> nn.Module:
    """``teacher`` (in place) on the device, in ``config``'s memory format, with rank 0's weights; eval mode."""
    teacher.to(ctx.device)
    if config.channels_last:
        teacher.to(memory_format=torch.channels_last)
    teacher.eval()
    broadcast_from_main([*teacher.parameters(), *teacher.buffers()], ctx)
    return teacher


def _store_output(into: dict[str, Tensor], path: str, training_only: bool) -> Callable[..., None]:
    """A forward hook that keeps the module's output under ``path`` (only in training mode if ``training_only``)."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not training_only or module.training:
            into[path] = output

    return hook


@dataclass
class Distiller:
    """The teacher of a run and the distillation loss it gives each micro-batch (module docstring).

    Build it with the bare student (before any DDP wrapper or ``torch.compile``, so that the hooks of
    ``distill_features`` are in place when the student is compiled); :meth:`remove_hooks` when training ends.

    Attributes:
        student: The bare model being trained.
        teacher: The placed teacher (:func:`place_teacher`).
        config: The run's settings (``distill_*``).
        forward: What runs the teacher: ``teacher``, or its ``torch.compile`` with ``config.compile``.
        stages: The stage paths matched with ``distill_features`` (empty without).
    """

    student: nn.Module
    teacher: nn.Module
    config: FinetuneConfig
    forward: Callable[[Tensor], Tensor] = field(init=False)
    stages: list[str] = field(init=False)
    _student_out: dict[str, Tensor] = field(init=False, default_factory=dict)
    _teacher_out: dict[str, Tensor] = field(init=False, default_factory=dict)
    _handles: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.stages = stage_paths(self.student) if self.config.distill_features else []
        for path in self.stages:
            student_hook = _store_output(self._student_out, path, training_only=True)
            teacher_hook = _store_output(self._teacher_out, path, training_only=False)
            self._handles.append(self.student.get_submodule(path).register_forward_hook(student_hook))
            self._handles.append(self.teacher.get_submodule(path).register_forward_hook(teacher_hook))
        self.forward = torch.compile(self.teacher) if self.config.compile else self.teacher

    def remove_hooks(self) -> None:
        """Removes the forward hooks of ``distill_features`` from both models."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._student_out.clear()
        self._teacher_out.clear()

    def loss(self, images: Tensor, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's loss given the student's ``logits`` for ``images``; runs the teacher once.

        Returns:
            The loss and its terms by metric name: ``train_ce``, ``train_kd`` and, with ``distill_features``,
            ``train_feat`` (the unweighted stage term).

        Raises:
            ValueError: The teacher's outputs do not have the student's shape.
            RuntimeError: ``distill_features`` and a stage output of the student without a gradient (a stage
                run under re-entrant activation checkpointing, whose inner outputs carry none).
        """
        config = self.config
        with torch.no_grad():
            teacher_logits = self.forward(images)
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"--distill: the teacher outputs shape {tuple(teacher_logits.shape)}, the model "
                f"{tuple(logits.shape)}; distil from the unshared original the model was made from"
            )
        terms = distillation_loss(
            logits,
            teacher_logits,
            labels,
            temperature=config.distill_temperature,
            weight=config.distill_weight,
            label_smoothing=config.label_smoothing,
        )
        total, named = terms.total, {"train_ce": terms.ce, "train_kd": terms.kd}
        if self.stages:
            feat = self._feature_loss(logits)
            total = total + config.distill_feature_weight * feat
            named["train_feat"] = feat
        return total, named

    def _feature_loss(self, logits: Tensor) -> Tensor:
        """The mean over :attr:`stages` of the mean squared difference of student and teacher outputs."""
        student, teacher = dict(self._student_out), dict(self._teacher_out)
        self._student_out.clear()
        self._teacher_out.clear()
        losses = []
        for path in self.stages:
            if path not in student or path not in teacher:
                raise RuntimeError(f"--distill-features: stage `{path}` did not run in the forward of both models")
            if logits.requires_grad and not student[path].requires_grad:
                raise RuntimeError(
                    f"--distill-features: the output of stage `{path}` carries no gradient (re-entrant activation "
                    "checkpointing runs it without); drop --grad-checkpointing or use non-reentrant checkpointing"
                )
            losses.append(F.mse_loss(student[path].float(), teacher[path].float()))
        return torch.stack(losses).mean()
