"""What ``--resume`` checks: the settings of a run, saved with each checkpoint, must not change.

A run's settings are its :class:`FinetuneConfig` and its *setup*: what :func:`~sharify.train.finetune`
sees of the data and processes (data source, image counts, classes, world size) plus the caller's
description of how it made the model and data (``sharify finetune`` passes its model, data and
sharing options). Resuming with other values would silently train another run -- a restored cosine
schedule of another length, another global batch, other images -- so :func:`check_resumable`
refuses, in one line listing the differences, except for

* :attr:`FinetuneConfig.RESUME_MAY_CHANGE`: speed, memory, logging and retention settings;
* a larger ``epochs``: :func:`~sharify.train.finetune` then rebuilds the cosine schedule over the new
  length from the current update on, so the remaining epochs follow the schedule of a run started
  with that many (a finished run restarts from that schedule's learning rate).

A different model shows in its state_dict, which :func:`~sharify.train.load_checkpoint` checks key by key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .checkpoint import read_state
from .config import FinetuneConfig
from .data import DataBundle
from .distributed import DistContext
from .errors import CheckpointError

__all__ = ["check_resumable", "config_settings", "json_value", "run_setup"]


def json_value(value: Any) -> Any:
    """``value`` with paths as strings and tuples as lists, as JSON gives it back."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return value


def config_settings(config: FinetuneConfig) -> dict[str, Any]:
    """``config`` as JSON values, as saved in ``config.json`` and the checkpoints."""
    return {k: json_value(v) for k, v in asdict(config).items()}


def run_setup(bundle: DataBundle, ctx: DistContext, setup: Mapping[str, Any]) -> dict[str, Any]:
    """What the run trains on beyond the config: the data and processes as seen here, and the caller's ``setup``."""
    seen = {
        "data_source": bundle.source or bundle.name,  # where the data came from (the caller's "data" is its own)
        "train_images": len(bundle.train),  # type: ignore[arg-type]
        "val_images": len(bundle.val),  # type: ignore[arg-type]
        "classes": bundle.num_classes,
        "world_size": ctx.world_size,
    }
    return {**seen, **json_value(dict(setup))}


def check_resumable(directory: Path, config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Refuses to resume checkpoint ``directory`` with other settings than it was trained with.

    Args:
        directory: The checkpoint.
        config: :func:`config_settings` of the new run.
        setup: :func:`run_setup` of the new run.

    Raises:
        CheckpointError: A difference other than those allowed (module docstring), or fewer ``epochs``
            than the checkpoint has done.
    """
    saved = read_state(directory)
    changes = []
    for new, old, free in (
        (config, saved.get("config", {}), FinetuneConfig.RESUME_MAY_CHANGE | {"epochs"}),
        (setup, saved.get("setup", {}), frozenset()),
    ):
        changes += [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k in old and k not in free and old[k] != new[k]]
    if changes:
        raise CheckpointError(
            f"--resume: {directory} was trained with other settings ({', '.join(changes)}); resume with that run's "
            "settings (only --epochs may grow), or start a new run with another --out"
        )
    if config["epochs"] < saved["epoch"]:
        raise CheckpointError(
            f"--resume: {directory} holds epoch {saved['epoch']}, beyond --epochs {config['epochs']}; "
            f"pass --epochs {saved['epoch']} or more"
        )
