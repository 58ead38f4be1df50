"""Training checkpoints that survive crashes and Ctrl-C, and resume exactly.

A checkpoint is a directory ``<out>/checkpoints/epoch-NNNN/`` holding

* ``model.safetensors``: the model's state_dict (each shared tensor once);
* ``ema.safetensors``: the EMA model's state_dict, when EMA is on;
* ``state.pt``: the training state that holds tensors -- the optimizer's state_dict (per-parameter
  tensors nested in dicts keyed by parameter index, which safetensors' flat name -> tensor files
  cannot hold without a home-made encoding) and every rank's RNG states (``torch.save``, loaded
  with ``weights_only=True``: tensors and plain data only);
* ``state.json``: the rest, readable without torch -- format, epoch, update count, file list,
  metrics so far, the run's settings, the schedule's and grad scaler's state, the CRC-32 of
  ``state.pt``; written last.

Each ``.safetensors`` file carries a CRC-32 of every tensor in its header (as :func:`sharify.save`
writes them), and :func:`load_checkpoint` (:func:`verify_checkpoint`) checks them and ``state.pt``'s
before loading anything, so a flipped byte is refused naming the file rather than resumed from.
Checkpoints written before the checksums existed load with a warning.

The directory is assembled under a temporary name and renamed into place (atomic on POSIX), so at
any moment every ``epoch-NNNN`` directory is complete; an interrupted save leaves only a
``.tmp-*`` directory, which the next save removes. Single files (the final ``model.safetensors``)
are written to a temporary file and renamed with :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..io import atomic
from ..io.serialization import _checksum
from .errors import CheckpointError

__all__ = [
    "atomic_write",
    "intact_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "read_state",
    "save_checkpoint",
    "save_weights",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

_DIR_RE = re.compile(r"^epoch-(\d{4,})$")
FORMAT_VERSION = 2
_STATE_JSON, _STATE_PT = "state.json", "state.pt"
_FORMAT1_MARKER = "meta.json"  # format 1: meta.json, and everything else pickled in state.pt
_CHECKSUMS = "sharify-checksums"  # safetensors metadata: JSON {key: CRC-32 of the tensor's bytes}


#: How a failed write reads in the command line's terms (see :func:`writing`).
_CANNOT_WRITE = "cannot write {path} ({reason}); check free space and permissions, or pass another --out"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Calls ``write(tmp_path)`` then renames the temporary file to ``path`` (all or nothing).

    The file gets the permissions of an ordinarily written file (``0o666`` less the umask); missing
    parent directories are created. This is :func:`sharify.io.atomic.atomic_write` with the errors of
    :func:`writing`.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write(path, write, message=_CANNOT_WRITE)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Re-raises an ``OSError`` of writing ``path`` (a full disk, no permission) as one naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise atomic.os_error(exc, path, _CANNOT_WRITE) from exc


def _tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def save_weights(state_dict: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``state_dict`` as safetensors, atomically (CPU, contiguous copies)."""
    tensors = _tensors(state_dict)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))


def _plain(value: Any) -> bool:
    """Whether JSON holds ``value`` exactly (no tensors, tuples or non-string keys)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


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

    Args:
        out_dir: The run's output directory.
        epoch: The epoch just completed.
        model_state: The model's state_dict (``model.safetensors``).
        state: Training state. Entries that JSON holds exactly (numbers, strings, lists, dicts with
            string keys) go to ``state.json``, the others -- tensors, e.g. optimizer and RNG state --
            to ``state.pt``.
        ema_state: The EMA model's state_dict (``ema.safetensors``).
        keep: Checkpoints to keep, newest first.

    Returns:
        The checkpoint directory.
    """
    root = Path(out_dir) / "checkpoints"
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"epoch-{epoch:04d}"
    with writing(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        _write_checkpoint(tmp, final, epoch, model_state, state, ema_state)
    done = sorted((d for d in root.iterdir() if _DIR_RE.match(d.name)), key=lambda d: d.name)
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(
    tmp: Path,
    final: Path,
    epoch: int,
    model_state: Mapping[str, Tensor],
    state: Mapping[str, Any],
    ema_state: Mapping[str, Tensor] | None,
) -> None:
    """Writes the checkpoint into ``tmp`` and renames it to ``final`` (``tmp`` is removed on failure)."""
    plain = {k: v for k, v in state.items() if _plain(v)}
    tensors = {k: v for k, v in state.items() if k not in plain}
    try:
        files = ["model.safetensors", _STATE_PT]
        _save_checked(model_state, tmp / "model.safetensors", epoch)
        if ema_state is not None:
            _save_checked(ema_state, tmp / "ema.safetensors", epoch)
            files.append("ema.safetensors")
        torch.save({**tensors, "epoch": epoch}, tmp / _STATE_PT)
        checksums = {_STATE_PT: _file_crc(tmp / _STATE_PT)}
        head = {"format": FORMAT_VERSION, "epoch": epoch, "files": files, "checksums": checksums}
        (tmp / _STATE_JSON).write_text(json.dumps({**plain, **head}, indent=1) + "\n")
        for name in [*files, _STATE_JSON]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # the same epoch saved again (e.g. a re-run after a crash)
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic.fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_checked(state_dict: Mapping[str, Tensor], path: Path, epoch: int) -> None:
    tensors = _tensors(state_dict)
    checksums = json.dumps({k: _checksum(v) for k, v in tensors.items()})
    try:
        save_file(tensors, str(path), metadata={"epoch": str(epoch), _CHECKSUMS: checksums})
    except OSError:
        raise
    except Exception as exc:  # safetensors reports a failed write (a full disk) as SafetensorError
        raise OSError(errno.EIO, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc


def _file_crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoint directories under ``out_dir/checkpoints``, newest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    markers = (_STATE_JSON, _FORMAT1_MARKER)
    done = [d for d in root.iterdir() if _DIR_RE.match(d.name) and any((d / m).is_file() for m in markers)]
    return sorted(done, key=_epoch, reverse=True)


def _epoch(directory: Path) -> int:
    return int(_DIR_RE.match(directory.name).group(1))  # type: ignore[union-attr]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``out_dir/checkpoints`` (``None`` if none)."""
    found = _checkpoints(out_dir)
    return found[0] if found else None


def intact_checkpoint(out_dir: str | Path, *, fallback: bool = False) -> Path | None:
    """The checkpoint to resume from: the newest, verified by :func:`verify_checkpoint`.

    Args:
        out_dir: The run's output directory.
        fallback: When the newest fails its checks, take the newest one that passes (with a warning).

    Returns:
        The checkpoint directory, ``None`` when there is no complete checkpoint.

    Raises:
        CheckpointError: The newest checkpoint is corrupt (without ``fallback``), or every one is.
    """
    found = _checkpoints(out_dir)
    for i, directory in enumerate(found):
        try:
            verify_checkpoint(directory)
            return directory
        except CheckpointError as exc:
            if not fallback:
                raise
            if i + 1 == len(found):
                message = f"--resume-fallback: no intact checkpoint in {out_dir}/checkpoints (the oldest: {exc})"
                raise CheckpointError(message) from None
            logger.warning("%s; --resume-fallback: trying %s", exc, found[i + 1])
    return None


def _fix_hint(directory: Path) -> str:
    number = _DIR_RE.match(directory.name)
    older = [d for d in _checkpoints(directory.parent.parent) if number and _epoch(d) < int(number.group(1))]
    if older:
        return f"pass --resume-fallback to resume from {older[0].name} instead, or start a new run with another --out"
    return f"no earlier checkpoint is left: start a new run (delete {directory.parent.parent} or pass another --out)"


def _read_weights(path: Path, directory: Path) -> dict[str, Tensor]:
    """The tensors of ``path``, checked against the CRC-32s in its header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        expected = json.loads(meta[_CHECKSUMS]) if _CHECKSUMS in meta else None
    except Exception as exc:  # safetensors raises SafetensorError/OSError on corrupt files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint file {path} is corrupt ({reason}); {_fix_hint(directory)}") from exc
    if expected is None:
        logger.warning("checkpoint file %s has no checksums (an older sharify wrote it): not verified", path)
        return tensors
    bad = sorted(set(expected) ^ set(tensors)) or [k for k in tensors if _checksum(tensors[k]) != expected[k]]
    if bad:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: tensor `{bad[0]}` does not match the checksum written with it; "
            f"{_fix_hint(directory)}"
        )
    return tensors


def _read_state_pt(directory: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    path = directory / _STATE_PT
    want = state.get("checksums", {}).get(_STATE_PT)
    if want is not None and _file_crc(path) != want:
        raise CheckpointError(f"checkpoint file {path} is corrupt (its CRC-32 differs); {_fix_hint(directory)}")
    try:
        tensors: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint file {path} is corrupt ({reason}); {_fix_hint(directory)}") from exc
    if not isinstance(tensors, dict) or tensors.get("epoch") != state["epoch"]:
        raise CheckpointError(
            f"checkpoint {directory}: {_STATE_PT} and {_STATE_JSON} disagree on the epoch; {_fix_hint(directory)}"
        )
    return tensors


def _load_into(module: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
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


def read_state(directory: str | Path) -> dict[str, Any]:
    """The plain training state of checkpoint ``directory`` (its ``state.json``), without loading tensors.

    Raises:
        CheckpointError: ``state.json`` is missing or unreadable, or the checkpoint has an older format.
    """
    directory = Path(directory)
    if not (directory / _STATE_JSON).is_file() and (directory / _FORMAT1_MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {directory} has the format of an older sharify (meta.json, everything in state.pt); "
            "resume it with that version, or start a new run with another --out"
        )
    try:
        state: dict[str, Any] = json.loads((directory / _STATE_JSON).read_text())
        int(state["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {directory}/{_STATE_JSON} is unreadable ({reason}); {_fix_hint(directory)}"
        ) from exc
    return state


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Reads checkpoint ``directory`` whole and checks it: files present, checksums, epochs agreeing.

    Returns:
        ``{"state": ..., "model": ..., "ema": ...}``: the merged training state and the weights (``ema``
        is ``None`` without ``ema.safetensors``).

    Raises:
        CheckpointError: A file is missing or corrupt (naming it).
    """
    directory = Path(directory)
    state = read_state(directory)
    for name in state.get("files", []):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} lacks {name}; {_fix_hint(directory)}")
    model = _read_weights(directory / "model.safetensors", directory)
    ema_path = directory / "ema.safetensors"
    ema = _read_weights(ema_path, directory) if ema_path.is_file() else None
    tensors = _read_state_pt(directory, state)
    return {"state": {**tensors, **state}, "model": model, "ema": ema}


def load_checkpoint(directory: str | Path, model: nn.Module, *, ema: nn.Module | None = None) -> dict[str, Any]:
    """Loads the weights of checkpoint ``directory`` into ``model`` (and ``ema``), returns its training state.

    Every file is read and checked (:func:`verify_checkpoint`) before anything is loaded, so a corrupt
    checkpoint leaves ``model`` as it was.

    Returns:
        The ``state`` given to :func:`save_checkpoint` (``state.json`` and ``state.pt`` merged), with
        ``format``, ``epoch`` and ``files``.

    Raises:
        CheckpointError: A file is missing or corrupt, or the weights do not fit the model.
    """
    directory = Path(directory)
    read = verify_checkpoint(directory)
    if ema is not None and read["ema"] is None:
        raise CheckpointError(f"checkpoint {directory} has no EMA weights but --ema is on; resume without --ema")
    _load_into(model, read["model"], directory / "model.safetensors")
    if ema is not None:
        _load_into(ema, read["ema"], directory / "ema.safetensors")
    return dict(read["state"])
