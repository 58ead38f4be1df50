"""Command line: ``sharify report MODEL``, ``sharify finetune ...`` (and ``python -m sharify ...``).

Errors print one line naming the problem and exit with status 2 (``--debug`` shows the traceback). Output
into a pipe whose reader has gone (``sharify report resnet50 | head -1``) ends quietly with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .errors import SharifyError
from .options import PRESETS, Selector
from .report import report
from .rewrite import sharify
from .zoo import build_model

__all__ = ["main"]


def _selector(text: str) -> Selector:
    try:
        return int(text)
    except ValueError:
        return text


def add_sharing_options(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`sharify.sharify`, shared by all subcommands (unset = preset/default)."""
    g = parser.add_argument_group("sharing (unset options take the preset's value)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a published variant (default: sharesnet)")
    g.add_argument("--positions", nargs="+", type=_selector, metavar="SEL",
                   help="branch convs to share: last_spatial (default), all_spatial, first, last, index")  # fmt: skip
    g.add_argument("--skip-first-block", action="store_true", default=None, help="leave stages' first blocks out")
    g.add_argument("--depthwise", action="store_true", default=None, help="let depthwise convs be shared")
    g.add_argument("--method", choices=["share", "basis"], help="share whole convs (default) or filter bases")
    g.add_argument("--shared-rank", type=int, help="basis: shared filters per 64 channels")
    g.add_argument("--unique-rank", type=int, help="basis: unique filters per 64 channels")
    g.add_argument("--init", help="share: average (default), first, random, scaled; basis: orthogonal (default), svd")
    g.add_argument("--align", action="store_true", default=None,
                   help="align the members' hidden channels before combining their weights (needs scipy)")  # fmt: skip
    g.add_argument("--input-size", nargs=3, type=int, metavar=("C", "H", "W"),
                   help="example input for the analysis (default: the model's own or 3x224x224)")  # fmt: skip


def sharing_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`sharify.sharify` from parsed options (``None`` where unset)."""
    kwargs: dict[str, Any] = {
        "preset": args.preset,
        "positions": tuple(args.positions) if args.positions else None,
        "skip_first_block": args.skip_first_block,
        "depthwise": args.depthwise,
        "method": args.method,
        "shared_rank": args.shared_rank,
        "unique_rank": args.unique_rank,
        "init": args.init,
        "align": args.align,
    }
    if args.input_size:
        kwargs["example_inputs"] = torch.empty(1, *args.input_size)
    return kwargs


def _report(args: argparse.Namespace) -> int:
    model, source = build_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes)
    shared = sharify(model, **sharing_kwargs(args))
    result = report(model, shared)
    if args.json:
        print(json.dumps({"source": {"library": source.library, "name": source.name}, **result.to_dict()}, indent=2))
    elif args.markdown:
        print(result.to_markdown())
    else:
        print(f"{source.library}:{source.name}")
        print(result)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .train.cli import run_finetune

    return run_finetune(args, sharing_kwargs(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharify", description="Share conv weights between residual blocks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="sharify a torchvision/timm model and print the parameter report")
    p.add_argument("model", help="model name: resnet50, timm:resnet50d, tv:resnet34, ...")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs internet)")
    p.add_argument("--num-classes", type=int, default=None)
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # a reader that has gone (`sharify report ... | head -1`) shows here, not at exit
        return status
    except BrokenPipeError:
        # The Python docs' recipe for SIGPIPE: point stdout at devnull so that the flush at interpreter exit
        # does not fail again, and exit with Python's status for EPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.debug:
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        return int(args.func(args))
    except (SharifyError, ValueError, TypeError, KeyError, FileNotFoundError, FloatingPointError, ImportError) as exc:
        if args.debug:
            raise
        print(f"sharify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("sharify: interrupted; completed checkpoints are intact (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
