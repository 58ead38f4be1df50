"""All-or-nothing file writes: the one atomic writer of :func:`sharify.save` and :mod:`sharify.train`.

:func:`atomic_write` has the caller write a temporary file in the target's directory, gives it the
permissions of an ordinarily written file, flushes it to disk and renames it over the target
(``os.replace``, atomic on POSIX), then flushes the directory. On any failure the temporary file is
removed and the target is untouched; a failed write (a full disk, no permission, also as safetensors
reports it) is re-raised as an ``OSError`` of the errno's subclass naming the user's path, never the
temporary file's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["WRITE_FAILED", "atomic_write", "fsync_dir", "os_error", "write_error"]

#: The message of a failed write: ``reason`` is the system's (``No space left on device``); the path
#: is the error's ``filename``. A message that has a ``{path}`` field names the path itself instead.
WRITE_FAILED = "cannot write the file ({reason})"


def fsync_dir(path: Path) -> None:
    """Flushes directory ``path`` (a rename in it becomes durable); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(exc: OSError, path: Path, message: str = WRITE_FAILED) -> OSError:
    """``exc`` (of the same errno) as an error of writing ``path``, in the words of ``message``.

    Args:
        exc: The error of the write.
        path: The user's path.
        message: The error's text, with ``{reason}`` (the system's words); with a ``{path}`` field it names
            ``path`` itself, otherwise ``path`` is the error's ``filename``.
    """
    code = exc.errno
    reason = exc.strerror or (os.strerror(code) if code else str(exc))
    if "{path}" in message:
        return OSError(code, message.format(path=path, reason=reason))
    return OSError(code, message.format(reason=reason), str(path))


def write_error(exc: BaseException, path: Path, message: str = WRITE_FAILED) -> OSError | None:
    """The ``OSError`` (of the errno's subclass) naming ``path`` for a failed write, ``None`` if ``exc`` is none.

    ``exc`` is an ``OSError``, or safetensors' error for an I/O failure ("I/O error: ... (os error 13) at
    path <temporary file>"); ``message`` as for :func:`os_error`.
    """
    if isinstance(exc, OSError):
        return os_error(exc, path, message)
    found = re.search(r"os error (\d+)", str(exc))
    code = int(found[1]) if found else (errno.EIO if "I/O error" in str(exc) else None)
    if code is None:
        return None
    return os_error(OSError(code, os.strerror(code)), path, message)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], *, message: str = WRITE_FAILED) -> None:
    """Calls ``write(tmp_path)`` then renames the temporary file to ``path`` (all or nothing).

    The file gets the permissions of an ordinarily written file (``0o666`` less the umask). The
    directory of ``path`` must exist.

    Args:
        path: The file to write.
        write: Writes the file's content to the path it is given.
        message: The text of the ``OSError`` of a failed write (see :func:`write_error`).

    Raises:
        OSError: The write failed (of the errno's subclass, e.g. ``PermissionError``), naming ``path``.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        try:
            tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:12]}")
            # 0o666 less the umask, as open() gives (mkstemp's 0o600 would make the file its owner's only)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as exc:
            error = write_error(exc, path, message)
            if error is None:
                raise
            raise error from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the file is written and in place: a failure here is not the write's
        fsync_dir(path.parent)
