"""Data-parallel plumbing for runs launched by ``torchrun``: rank, device, reductions.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed` reads them
(``env://`` initialisation), picks NCCL for CUDA and gloo for CPU, and binds each process to its
local GPU. Without those variables it returns a single-process context, so the same code runs
with ``python -m sharify finetune`` and ``torchrun -m sharify finetune``. No process management
happens here: launching is torchrun's job.

Example:
    >>> ctx = init_distributed("cpu")
    >>> ctx.world_size, ctx.is_main
    (1, True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_from_main",
    "cleanup",
    "ddp_static_graph",
    "init_distributed",
    "sync_from_main",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without a GPU or another device type -> ``ValueError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Initialises ``torch.distributed`` from torchrun's environment, or returns a 1-process context.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (the local rank's GPU is used under torchrun).

    Returns:
        The process's :class:`DistContext`.
    """
    dev = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def ddp_static_graph(grad_checkpointing: bool) -> bool:
    """Whether DDP needs ``static_graph=True``: only with timm's re-entrant activation checkpointing.

    A shared weight is used by several blocks. Re-entrant checkpointing runs each checkpointed block's
    backward as a separate pass, so the weight's gradient becomes ready several times per iteration, which
    DDP refuses ("Expected to mark a variable ready only once") unless it knows the graph is static.
    Non-reentrant checkpointing (timm's default, ``timm.layers.set_reentrant_ckpt(False)``) needs nothing
    special. ``static_graph`` excludes ``no_sync()``, so accumulation then reduces every micro-batch
    (:class:`~sharify.train.loop.Trainer`).

    Args:
        grad_checkpointing: Whether the model runs with ``set_grad_checkpointing(True)``.
    """
    if not grad_checkpointing:
        return False
    try:
        from timm.layers import use_reentrant_ckpt
    except ImportError:  # timm before set_reentrant_ckpt always checkpointed re-entrant
        return True
    return bool(use_reentrant_ckpt())


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sums a list of numbers over all ranks (identity in a single process)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def broadcast_from_main(tensors: Iterable[Tensor], ctx: DistContext) -> None:
    """Overwrites each tensor in place with rank 0's value (no-op in a single process).

    Used for what DDP leaves per process: BatchNorm running statistics (updated locally by every
    forward pass), an EMA copy (which averages them), and a model built independently on each rank.
    """
    if not ctx.distributed:
        return
    for tensor in tensors:
        if tensor.is_contiguous():
            dist.broadcast(tensor, src=0)
        else:  # channels-last weights: broadcast a contiguous copy
            flat = tensor.contiguous()
            dist.broadcast(flat, src=0)
            tensor.copy_(flat)


def sync_from_main(module: nn.Module, ema_module: nn.Module | None, ctx: DistContext) -> None:
    """Gives every rank rank 0's buffers (BatchNorm statistics) and EMA weights (no-op in a single process).

    DDP keeps the weights equal across ranks, but each rank's forward passes update its own running
    statistics (DDP broadcasts rank 0's only at the start of the next forward), and the EMA copy
    averages those. Without this the reduced validation metrics would average slightly different
    models, none of them the one rank 0 saves.
    """
    broadcast_from_main(module.buffers(), ctx)
    if ema_module is not None:
        broadcast_from_main([*ema_module.parameters(), *ema_module.buffers()], ctx)


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Destroys the process group created by :func:`init_distributed`."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
