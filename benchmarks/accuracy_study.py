"""Does sharing keep the accuracy? Fashion-MNIST, CPU: the cost of sharify on a trained model, and what
fine-tuning buys back, per initialisation; plus the papers' equal-budget comparisons.

    python -m benchmarks.accuracy_study                    # the full study (budget: see --help defaults)
    python -m benchmarks.accuracy_study --smoke            # a ~1 minute run of every step on a tiny subset
    python -m benchmarks.accuracy_study --from-json benchmarks/results/accuracy_study/study.json
                                                           # rewrite the table and plot from the results, no training

Steps (one command, every run through ``sharify.train.finetune``):

1. **Baseline**: He et al.'s CIFAR ResNet (``--depth``, 3 stages of ``--width``/2x/4x channels, 1 input
   channel) trained from scratch for ``--baseline-epochs``.
2. **Variants**: the trained baseline sharified with each initialisation, evaluated before any update
   (epoch 0) and after each of ``--finetune-epochs`` epochs of one fine-tuning schedule (the same for all):
   ``random``, ``first``, ``average``, ``average`` + BatchNorm re-calibration, ``scaled`` (per-member channel
   gains folded into the BatchNorms) with and without re-calibration, and ``method="basis"`` with
   ``init="svd"`` at ranks giving a similar parameter count; then ``average``, ``scaled`` (each with and
   without re-calibration) and the basis variant again with ``align=True``, which first permutes each
   block's hidden channels to match the other blocks (``--no-align`` leaves those rows out). A control
   run fine-tunes the unshared baseline with the same schedule, so the gain of the extra epochs alone is
   visible.
3. **Equal budget**: the sharified architecture trained from scratch with the baseline's schedule, and a
   shallower plain ResNet (``--depth - 6``) with about the sharified model's parameter count.

Writes ``--out`` (default ``benchmarks/results/accuracy_study/``): ``accuracy_study.md`` (table),
``accuracy_study.png`` (accuracy vs fine-tune epochs per init; accuracy vs parameters), ``study.json``
(configuration, seeds, command, git commit, machine, data, all metrics) and each run's
``metrics.jsonl``/``report.md``/``config.json``. The filter-basis variants fine-tune with the orthogonality
regulariser (``--lambda-r``, the paper's 10), every other run without it; the table says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sharify
from benchmarks.accuracy_study_report import Run, lambda_r, run_dir_name, write_report
from benchmarks.cifar_models import cifar_resnet
from sharify.train import DataBundle, finetune, load_data

RESULTS = Path(__file__).parent / "results" / "accuracy_study"


def variants(args: argparse.Namespace) -> list[tuple[str, dict[str, Any], int]]:
    """(name, sharify options, BatchNorm re-calibration images) of the fine-tuned variants."""
    basis = {"method": "basis", "positions": ("last_spatial",), "init": "svd",
             "shared_rank": args.shared_rank, "unique_rank": args.unique_rank}  # fmt: skip
    rows = [
        ("random", {"init": "random"}, 0),
        ("first", {"init": "first"}, 0),
        ("average", {"init": "average"}, 0),
        ("average + BN recal.", {"init": "average"}, args.bn_images),
        ("scaled", {"init": "scaled"}, 0),
        ("scaled + BN recal.", {"init": "scaled"}, args.bn_images),
        (f"basis S{args.shared_rank}U{args.unique_rank} (svd)", basis, 0),
    ]
    if args.align:  # the same inits after aligning the members' hidden channels (sharify.align)
        rows += [
            ("aligned average", {"init": "average", "align": True}, 0),
            ("aligned average + BN recal.", {"init": "average", "align": True}, args.bn_images),
            ("aligned scaled", {"init": "scaled", "align": True}, 0),
            ("aligned scaled + BN recal.", {"init": "scaled", "align": True}, args.bn_images),
            (f"aligned basis S{args.shared_rank}U{args.unique_rank} (svd)", {**basis, "align": True}, 0),
        ]
    return rows


def _train(name: str, kind: str, model: nn.Module, data: DataBundle, out: Path, args: argparse.Namespace,
           *, epochs: int, lr: float, original: nn.Module | None = None, eval_before: bool = False,
           bn_recalibrate: int = 0, options: dict[str, Any] | None = None) -> Run:  # fmt: skip
    run_dir = out / "runs" / run_dir_name(name)
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = finetune(
        model, data, out=run_dir, epochs=epochs, lr=lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        warmup_epochs=0, seed=args.seed, eval_before=eval_before, bn_recalibrate=bn_recalibrate,
        original=original, quiet=True, workers=args.workers, keep_checkpoints=1, device="cpu",
        channels_last=args.channels_last, lambda_r=lambda_r(options or {}, args),
    )  # fmt: skip
    run = Run(name, kind, sum(p.numel() for p in result.model.parameters()), result.metrics,
              time.perf_counter() - start, options or {}, lambda_r=lambda_r(options or {}, args))  # fmt: skip
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # weights are not results; metrics are
    (run_dir / "model.safetensors").unlink(missing_ok=True)
    accs = ", ".join(f"e{m['epoch']} {m['top1']:.2f}" for m in run.metrics)
    print(
        f"[{time.strftime('%H:%M:%S')}] {name}: params {run.params:,}, top-1 {accs} ({run.seconds:.0f} s)", flush=True
    )
    return run


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = load_data("fashion-mnist", root=args.data_root, subset=args.subset or None,
                     val_subset=args.val_subset or None, seed=args.seed)  # fmt: skip
    x = torch.empty(1, 1, *data.image_size) if data.image_size else None
    out: Path = args.out
    runs: list[Run] = []

    baseline_model = cifar_resnet(args.depth, num_classes=data.num_classes, in_chans=1, width=args.width)
    baseline = _train("baseline", "baseline", baseline_model, data, out, args, epochs=args.baseline_epochs, lr=args.lr)
    runs.append(baseline)
    trained = baseline_model.eval()
    # The control: the unshared baseline fine-tuned with the variants' schedule, so that what the extra
    # epochs alone buy is not credited to sharing.
    runs.append(_train("baseline + same fine-tune (control)", "control", copy.deepcopy(trained), data, out, args,
                       epochs=args.finetune_epochs, lr=args.finetune_lr, eval_before=True))  # fmt: skip

    for name, options, bn_images in variants(args):
        shared = sharify.sharify(copy.deepcopy(trained), example_inputs=x, **options)
        errors = [g.dissimilarity for g in sharify.report(trained, shared).groups if g.dissimilarity is not None]
        run = _train(name, "variant", shared, data, out, args, epochs=args.finetune_epochs, lr=args.finetune_lr,
                     original=trained, eval_before=True, bn_recalibrate=bn_images, options=options)  # fmt: skip
        run.dissimilarity = sum(errors) / len(errors) if errors else None
        runs.append(run)

    torch.manual_seed(args.seed)
    scratch = sharify.sharify(cifar_resnet(args.depth, num_classes=data.num_classes, in_chans=1, width=args.width),
                              example_inputs=x, init="random")  # fmt: skip
    runs.append(_train("shared, from scratch", "scratch", scratch, data, out, args, epochs=args.baseline_epochs,
                       lr=args.lr, options={"init": "random"}))  # fmt: skip
    torch.manual_seed(args.seed)
    shallow = cifar_resnet(args.depth - 6, num_classes=data.num_classes, in_chans=1, width=args.width)
    runs.append(_train(f"plain ResNet-{args.depth - 6}, from scratch", "scratch", shallow, data, out, args,
                       epochs=args.baseline_epochs, lr=args.lr))  # fmt: skip
    return {"runs": runs, "data": data}


def _machine() -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "sharify": sharify.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_at_end": load}  # fmt: skip


def git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout this file is in, or ``"unknown"`` (no git, not a checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=30, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def write_results(args: argparse.Namespace, runs: list[Run], data: DataBundle, command: str, seconds: float,
                  commit: str) -> None:  # fmt: skip
    """``study.json`` (everything), then the table and plot made from it (as ``--from-json`` makes them)."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command, "seconds": seconds, "git_commit": commit, "machine": _machine(),
        "data": {"source": str(data.source), "train_images": len(data.train), "val_images": len(data.val),
                 "classes": data.num_classes},
        "args": {k: str(v) for k, v in vars(args).items()}, "runs": [{**vars(r)} for r in runs],
    }  # fmt: skip
    (out / "study.json").write_text(json.dumps(payload, indent=2, default=str))
    write_report(json.loads(json.dumps(payload, default=str)), out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=int, default=16)
    # The default budget (16 runs) took 83 min on 2 CPU cores, which train this ResNet-20 at ~280 images/s
    # (results/accuracy_study): a fixed random 15,000 of the 60,000 training images, 5,000 of the 10,000
    # test images. --no-align leaves out the 5 aligned variants (~22 min).
    p.add_argument("--subset", type=int, default=15_000, help="training images (0: all 60,000)")
    p.add_argument("--val-subset", type=int, default=5_000, help="test images (0: all 10,000)")
    p.add_argument("--baseline-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--bn-images", type=int, default=1024, help="images for BatchNorm re-calibration")
    p.add_argument("--shared-rank", type=int, default=24, help="basis variant: shared filters per 64 channels")
    p.add_argument("--unique-rank", type=int, default=8, help="basis variant: unique filters per 64 channels")
    p.add_argument("--lambda-r", type=float, default=10.0, help="orthogonality regulariser of the basis variant")
    p.add_argument("--align", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the inits with align=True (channel alignment of the members)")  # fmt: skip
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="train in channels-last memory format (about 1.3x faster on this CPU)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="tiny subsets and 1 epoch each: checks every step quickly")
    p.add_argument("--from-json", type=Path, metavar="STUDY_JSON",
                   help="no training: rewrite accuracy_study.md and .png next to this study.json")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.from_json:
        write_report(json.loads(args.from_json.read_text()), args.from_json.parent)
        print((args.from_json.parent / "accuracy_study.md").read_text())
        return 0
    if args.smoke:
        args.depth, args.width = 14, 8
        args.subset, args.val_subset = 256, 256
        args.baseline_epochs, args.finetune_epochs, args.bn_images = 1, 1, 64
    command = "python -m benchmarks.accuracy_study " + " ".join(argv if argv is not None else sys.argv[1:])
    commit, start = git_commit(), time.perf_counter()  # the code that runs: the commit at the start
    study = run_study(args)
    write_results(args, study["runs"], study["data"], command.strip(), time.perf_counter() - start, commit)
    print((args.out / "accuracy_study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
