"""The files a run writes besides its checkpoints: ``config.json``, the report, ``metrics.jsonl``, the final weights.

Each is written atomically (a crash leaves the previous version or none, never half a file) and only by
rank 0; :mod:`sharify.train.finetune` says what each holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..io.serialization import save
from ..report import report
from .checkpoint import atomic_write, writing

__all__ = ["append_metrics", "save_final", "write_config", "write_metrics", "write_report"]


def write_config(out: Path, settings: Mapping[str, Any], setup: Mapping[str, Any]) -> None:
    """Writes ``config.json``: the run's settings, and its setup under ``"setup"``."""
    text = json.dumps({**settings, "setup": setup}, indent=2) + "\n"
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(text))


def write_report(out: Path, original: nn.Module, module: nn.Module) -> None:
    """Writes the parameter report of ``module`` against the unshared ``original`` (``report.json``/``.md``)."""
    result = report(original, module)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n"))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(result.to_markdown() + "\n"))


def write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    """Writes ``metrics.jsonl`` anew, one JSON line per record."""
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Appends one record to ``metrics.jsonl`` and syncs it to disk."""
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_final(out: Path, module: nn.Module, ema_module: nn.Module | None, epochs: int) -> None:
    """Writes ``model.safetensors`` (and ``model_ema.safetensors``) with :func:`sharify.save`.

    The sharing recipe in the header lets ``sharify.load(path)`` rebuild the model.
    """
    meta = {"sharify-finetune-epochs": str(epochs)}
    with writing(out / "model.safetensors"):
        save(module, out / "model.safetensors", metadata=meta)
    if ema_module is not None:
        with writing(out / "model_ema.safetensors"):
            save(ema_module, out / "model_ema.safetensors", metadata=meta)
