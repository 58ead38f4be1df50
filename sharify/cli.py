"""Command line: ``sharify report MODEL``, ``sharify finetune ...`` (and ``python -m sharify ...``).

Bad options and inputs print one line naming the problem and exit with status 2 (``--debug`` shows the
traceback); failures of the system (a full disk, an unwritable file) and unexpected errors print one line and
exit with status 1. Output into a pipe whose reader has gone (``sharify report resnet50 | head -1``) ends
quietly with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ._argtypes import OutputError, positive_int, write_stdout
from .errors import SharifyError
from .io.zoo import build_model
from .planning.options import option_fields, option_flag
from .report import report
from .rewrite.apply import sharify

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (``sharify finetune: error: ...; see --help``), exit status 2."""

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Python-API wording in library messages -> the command line's flags (the CLI's users never write Python).
_CLI_WORDING: tuple[tuple[str, str], ...] = (
    (r"(?:example_inputs=)?torch\.randn\(\d+, (\d+), (\d+), (\d+)\)", r"--input-size \1 \2 \3"),
    (r"example_inputs=torch\.randn\(\.\.\.\)", "--input-size C H W"),
    (r"example_inputs\[0\]", "the example input (--input-size)"),
    (r"\bexample_inputs=?", "--input-size C H W"),
    (r"\bleaf_modules=?", "--leaf-modules PATH"),
    (r"\bmethod='(\w+)'", r"--method \1"),
    (r"\b(shared|unique)_rank\b", r"--\1-rank"),
    (r"\bskip_first_block\b", "--skip-first-block"),
)


def cli_message(text: str) -> str:
    """A library error message in the command line's terms: its flags instead of Python arguments."""
    for pattern, replacement in _CLI_WORDING:
        text = re.sub(pattern, replacement, text)
    return text


def add_sharing_options(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`sharify.sharify`, shared by all subcommands (unset = preset/default).

    One flag per field of :class:`~sharify.SharingOptions`, its help and form from the field's metadata.
    """
    g = parser.add_argument_group("sharing (unset options take the preset's value)")
    for f in option_fields():
        g.add_argument(option_flag(f.name), default=None, help=f.metadata["help"], **f.metadata["cli"])
    g.add_argument("--input-size", nargs=3, type=positive_int, metavar=("C", "H", "W"),
                   help="example input for the analysis (default: the model's own or 3x224x224)")  # fmt: skip
    g.add_argument("--leaf-modules", nargs="+", metavar="PATH",
                   help="submodules (dotted paths) torch.fx must not trace into")  # fmt: skip


def sharing_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`sharify.sharify` from parsed options (``None`` where unset)."""
    kwargs: dict[str, Any] = {}
    for f in option_fields():
        value = getattr(args, f.name)
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value  # nargs="+": --positions
    if args.leaf_modules:
        kwargs["leaf_modules"] = tuple(args.leaf_modules)
    if args.input_size:
        kwargs["example_inputs"] = torch.empty(1, *args.input_size)
    return kwargs


def _report(args: argparse.Namespace) -> int:
    model, source = build_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes)
    shared = sharify(model, **sharing_kwargs(args))
    result = report(model, shared)
    if args.json:
        text = json.dumps({"source": {"library": source.library, "name": source.name}, **result.to_dict()}, indent=2)
    elif args.markdown:
        text = result.to_markdown()
    else:
        text = f"{source.library}:{source.name}\n{result}"
    write_stdout(text)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .train.cli import run_finetune

    return run_finetune(args, sharing_kwargs(args))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sharify", description="Share conv weights between residual blocks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("report", help="sharify a torchvision/timm model and print the parameter report")
    p.add_argument("model", help="model name: resnet50, timm:resnet50d, tv:resnet34, ...")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs internet)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (default: the model's)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    add_sharing_options(p)
    p.set_defaults(func=_report)

    from .train.cli import GPU_EXAMPLE, add_finetune_options

    f = sub.add_parser(
        "finetune",
        help="fine-tune a sharified (or plain) model; runs data-parallel under torchrun",
        description="Build, sharify and fine-tune a model; writes report.json, metrics.jsonl, checkpoints and "
        "model.safetensors to --out. Data-parallel: torchrun --nproc_per_node N -m sharify finetune ...",
        epilog=f"GPU example: {GPU_EXAMPLE}",
    )
    add_finetune_options(f)
    add_sharing_options(f)
    f.set_defaults(func=_finetune)
    return parser


def _silence_stdout() -> None:
    """Points stdout at devnull, so that the flush at interpreter exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(argv)
        try:
            sys.stdout.flush()  # a reader that has gone (`sharify report ... | head -1`) shows here, not at exit
        except BrokenPipeError:
            raise
        except OSError as exc:  # `> /dev/full`: the buffered output fails here
            raise OutputError(exc.errno, f"cannot write the output to stdout ({exc.strerror or exc})") from exc
        return status
    except BrokenPipeError:
        # The Python docs' recipe for SIGPIPE, with Python's exit status for EPIPE.
        _silence_stdout()
        return 1
    except OutputError as exc:
        _silence_stdout()
        print(f"sharify: error: {exc.strerror}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    with warnings.catch_warnings():  # the filters and the one-line format last as long as the command
        if not args.debug:
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")
            warnings.showwarning = _show_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except (OutputError, BrokenPipeError):
        raise
    except (SharifyError, ValueError, TypeError, KeyError, FileNotFoundError, FloatingPointError, ImportError) as exc:
        if args.debug:
            raise
        print(f"sharify: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, an unwritable file, ...: the system's failure, not the input's
        if args.debug:
            raise
        what = exc.strerror or str(exc)
        print(f"sharify: error: {what}: {exc.filename}" if exc.filename else f"sharify: error: {what}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"sharify: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen input: still one line, the traceback with --debug
        if args.debug:
            raise
        print(f"sharify: error: {type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Warnings as one line in the command line's terms (``--debug`` keeps Python's format)."""
    print(f"sharify: warning: {cli_message(' '.join(str(message).split()))}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if not type(exc).__module__.startswith("sharify.train"):  # fine-tuning's own errors name the CLI's options
        text = cli_message(text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


def _resume_hint(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C: ``--resume`` only when ``--out`` holds a complete checkpoint."""
    if args.command != "finetune":
        return ""
    from .train.checkpoint import latest_checkpoint

    found = latest_checkpoint(args.out)
    if found is None:
        return f" before the first checkpoint; nothing to resume in {args.out}: rerun the command (without --resume)"
    return f"; completed checkpoints are intact (newest: {found}); continue with the same command and --resume"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
