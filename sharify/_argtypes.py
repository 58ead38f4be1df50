"""argparse types and the stdout writer of the two command lines (:mod:`sharify.cli`, :mod:`sharify.train.cli`)."""

from __future__ import annotations

import argparse
import math

__all__ = ["OutputError", "delta_rank_arg", "finite_float", "fraction_arg", "positive_int", "write_stdout"]


class OutputError(OSError):
    """Writing the command's output to stdout failed (a full disk, a device error)."""


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite float (``nan`` and ``inf`` are refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def delta_rank_arg(text: str) -> int | str:
    """An argparse type: ``"full"`` or an integer >= 0."""
    if text == "full":
        return text
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be an integer >= 0 or "full", got {text}')
    return value


def fraction_arg(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


positive_int.__name__ = "positive integer"
delta_rank_arg.__name__ = "rank"
fraction_arg.__name__ = "fraction"  # argparse names the type in "invalid <name> value"
finite_float.__name__ = "number"


def write_stdout(text: str) -> None:
    """Prints ``text``; a failing stdout (``> /dev/full``) raises :class:`OutputError` (a reader gone: EPIPE)."""
    try:
        print(text)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc.errno, f"cannot write the output to stdout ({exc.strerror or exc})") from exc
