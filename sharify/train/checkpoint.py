"""Training checkpoints that survive crashes and Ctrl-C, and resume exactly.

A checkpoint is a directory ``<out>/checkpoints/epoch-NNNN/`` holding

* ``model.safetensors``: the model's state_dict (each shared tensor once);
* ``ema.safetensors``: the EMA model's state_dict, when EMA is on;
* ``state.pt``: everything that is not a tensor dict -- optimizer, scheduler, grad scaler, epoch,
  update count, RNG states of every rank, metrics so far (``torch.save``, loaded with
  ``weights_only=True``);
* ``meta.json``: epoch and file list, written last.

The directory is assembled under a temporary name and renamed into place (atomic on POSIX), so at
any moment every ``epoch-NNNN`` directory is complete; an interrupted save leaves only a
``.tmp-*`` directory, which the next save removes. Single files (the final ``model.safetensors``)
are written to a temporary file and renamed with :func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError

__all__ = ["atomic_write", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "save_weights"]

_DIR_RE = re.compile(r"^epoch-(\d{4,})$")
FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Calls ``write(tmp_path)`` then renames the temporary file to ``path`` (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def save_weights(state_dict: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``state_dict`` as safetensors, atomically (CPU, contiguous copies)."""
    from safetensors.torch import save_file

    tensors = _tensors(state_dict)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))


def save_checkpoint(
    out_dir: str | Path,
    epoch: int,
    model_state: Mapping[str, Tensor],
    state: Mapping[str, Any],
    *,
    ema_state: Mapping[str, Tensor] | None = None,
    keep: int = 1,
) -> Path:
    """Writes checkpoint ``epoch`` under ``out_dir/checkpoints`` and keeps the ``keep`` newest.

    Returns:
        The checkpoint directory.
    """
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        files = ["model.safetensors", "state.pt"]
        save_file(_tensors(model_state), str(tmp / "model.safetensors"), metadata={"epoch": str(epoch)})
        if ema_state is not None:
            save_file(_tensors(ema_state), str(tmp / "ema.safetensors"), metadata={"epoch": str(epoch)})
            files.append("ema.safetensors")
        torch.save(dict(state), tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"epoch": epoch, "format": FORMAT_VERSION, "files": files}))
        for name in [*files, "meta.json"]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # the same epoch saved again (e.g. a re-run after a crash)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted((d for d in root.iterdir() if _DIR_RE.match(d.name)), key=lambda d: d.name)
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``out_dir/checkpoints`` (``None`` if none)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [d for d in root.iterdir() if _DIR_RE.match(d.name) and (d / "meta.json").is_file()]
    return max(done, key=lambda d: int(_DIR_RE.match(d.name).group(1))) if done else None  # type: ignore[union-attr]


def _fix_hint(directory: Path) -> str:
    return f"delete {directory} to resume from the checkpoint before it, or start a new run without --resume"


def _load_into(module: nn.Module, path: Path, directory: Path) -> None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError/OSError on corrupt files
        raise CheckpointError(f"checkpoint file {path} is corrupt ({exc}); {_fix_hint(directory)}") from exc
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or extra or wrong:
        what = (
            f"missing key {missing[0]!r}"
            if missing
            else f"unexpected key {extra[0]!r}"
            if extra
            else f"{wrong[0]!r} has shape {tuple(tensors[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}"
        )
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({what}); resume with the same --model, --num-classes and "
            "sharing options as the run that wrote it, or use another --out"
        )
    module.load_state_dict(tensors, strict=True)


def load_checkpoint(directory: str | Path, model: nn.Module, *, ema: nn.Module | None = None) -> dict[str, Any]:
    """Loads the weights of checkpoint ``directory`` into ``model`` (and ``ema``), returns its state.

    Raises:
        CheckpointError: A file is missing or corrupt, or the weights do not fit the model.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        int(meta["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {directory}/meta.json is unreadable ({exc}); {_fix_hint(directory)}"
        ) from exc
    for name in meta.get("files", []):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} lacks {name}; {_fix_hint(directory)}")
    _load_into(model, directory / "model.safetensors", directory)
    if ema is not None:
        if not (directory / "ema.safetensors").is_file():
            raise CheckpointError(f"checkpoint {directory} has no EMA weights but --ema is on; resume without --ema")
        _load_into(ema, directory / "ema.safetensors", directory)
    try:
        state: dict[str, Any] = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint file {directory}/state.pt is corrupt ({exc}); {_fix_hint(directory)}"
        ) from exc
    if state.get("epoch") != meta["epoch"]:
        raise CheckpointError(
            f"checkpoint {directory}: state.pt and meta.json disagree on the epoch; {_fix_hint(directory)}"
        )
    return state
