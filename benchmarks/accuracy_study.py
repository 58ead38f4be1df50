"""Does sharing keep the accuracy? Fashion-MNIST, CPU: the cost of sharify on a trained model, and what
fine-tuning buys back, per initialisation; plus the papers' equal-budget comparisons.

    python -m benchmarks.accuracy_study                    # the full study (budget: see --help defaults)
    python -m benchmarks.accuracy_study --smoke            # a ~1 minute run of every step on a tiny subset

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
(configuration, seeds, command, machine, all metrics) and each run's ``metrics.jsonl``/``report.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sharify
from benchmarks.cifar_models import cifar_resnet
from sharify.train import DataBundle, finetune, load_data

RESULTS = Path(__file__).parent / "results" / "accuracy_study"


@dataclass
class Run:
    name: str
    kind: str  # "baseline" | "control" | "variant" | "scratch"
    params: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    #: Mean over groups of ``sharify.report``'s relative error of the members against what the shared
    #: model computes in their place, right after sharifying (variants only).
    dissimilarity: float | None = None

    def top1(self, epoch: int) -> float | None:
        return next((m["top1"] for m in self.metrics if m["epoch"] == epoch), None)


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
    run_dir = out / "runs" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = finetune(
        model, data, out=run_dir, epochs=epochs, lr=lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        warmup_epochs=0, seed=args.seed, eval_before=eval_before, bn_recalibrate=bn_recalibrate,
        original=original, quiet=True, workers=args.workers, keep_checkpoints=1, device="cpu",
        channels_last=args.channels_last,
        lambda_r=args.lambda_r if (options or {}).get("method") == "basis" else 0.0,
    )  # fmt: skip
    run = Run(name, kind, sum(p.numel() for p in result.model.parameters()), result.metrics,
              time.perf_counter() - start, options or {})  # fmt: skip
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


def write_results(args: argparse.Namespace, runs: list[Run], data: DataBundle, command: str, seconds: float) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = runs[0]
    base_acc = base.top1(args.baseline_epochs) or 0.0
    epochs = sorted({0, 1, 2, args.finetune_epochs} & set(range(args.finetune_epochs + 1)))
    lines = [
        "# Accuracy study: sharify on a trained ResNet, Fashion-MNIST, CPU",
        "",
        f"Command: `{command}`  ",
        f"Total wall time: {seconds / 60:.1f} min on {os.cpu_count()} CPU cores "
        f"(load average at the end: {_machine()['load_avg_at_end']}).",
        "",
        f"Data: Fashion-MNIST ({len(data.train):,} train / {len(data.val):,} test images, {data.source}). "
        f"Model: CIFAR ResNet-{args.depth} (width {args.width}, 1 input channel). Seed {args.seed}.",
        f"Baseline: {args.baseline_epochs} epochs from scratch, SGD (timm, Nesterov) lr {args.lr} cosine, batch "
        f"{args.batch_size}, weight decay {args.weight_decay}, random crop + flip. Fine-tuning: {args.finetune_epochs} "
        f"epochs, same recipe with lr {args.finetune_lr}; accuracy is top-1 on the test set after each epoch "
        "(epoch 0 = right after sharifying, before any update).",
        "",
        f"Baseline top-1: **{base_acc:.2f} %** with {base.params:,} parameters ({base.seconds / 60:.1f} min).",
        "",
        "| variant | params | fewer params | "
        + " | ".join(f"top-1 after {e} ep." for e in epochs)
        + f" | vs baseline after {args.finetune_epochs} ep. | member error | wall time |",
        "|---|---:|---:|" + "---:|" * len(epochs) + "---:|---:|---:|",
    ]
    for run in runs[1:]:
        if run.kind in ("variant", "control"):
            accs = [run.top1(e) for e in epochs]
            final = run.top1(args.finetune_epochs)
        else:
            accs = [None] * (len(epochs) - 1) + [run.top1(args.baseline_epochs)]
            final = run.top1(args.baseline_epochs)
        cells = " | ".join("-" if a is None else f"{a:.2f}" for a in accs)
        delta = "-" if final is None else f"{final - base_acc:+.2f} pp"
        error = "-" if run.dissimilarity is None else f"{run.dissimilarity:.3f}"
        lines.append(f"| {run.name} | {run.params:,} | {1 - run.params / base.params:.1%} | {cells} | {delta} "
                     f"| {error} | {run.seconds / 60:.1f} min |")  # fmt: skip
    lines += ["", "Rows 'from scratch' are trained with the baseline's schedule; their accuracy is in the last column.",
              "Member error: `sharify.report`'s relative error ||W_i - W_i'|| / ||W_i|| of each original conv "
              "against what the sharified model computes in its place (gains and bases included), mean over groups.",
              "Raw per-epoch metrics: `runs/*/metrics.jsonl`; everything in `study.json`."]  # fmt: skip
    summary = _summary(args, runs, base_acc, data.num_classes)
    lines += ["", "## Findings (computed from the table)", "", *summary]
    (out / "accuracy_study.md").write_text("\n".join(lines) + "\n")
    payload = {
        "command": command, "seconds": seconds, "machine": _machine(),
        "args": {k: str(v) for k, v in vars(args).items()}, "runs": [{**vars(r)} for r in runs],
    }  # fmt: skip
    (out / "study.json").write_text(json.dumps(payload, indent=2, default=str))
    _plot(args, runs, out / "accuracy_study.png")


def _summary(args: argparse.Namespace, runs: list[Run], base_acc: float, num_classes: int) -> list[str]:
    variants_ = [r for r in runs if r.kind == "variant"]
    lines = []
    best = max(variants_, key=lambda r: r.top1(args.finetune_epochs) or 0.0)
    gap = base_acc - (best.top1(args.finetune_epochs) or 0.0)
    lines.append(f"- Best sharified variant after {args.finetune_epochs} fine-tune epochs: **{best.name}**, "
                 f"{best.top1(args.finetune_epochs):.2f} % ({-gap:+.2f} pp vs baseline) with "
                 f"{1 - best.params / runs[0].params:.1%} fewer parameters; target: within 0.5 pp "
                 f"-> {'met' if gap <= 0.5 else 'NOT met'}.")  # fmt: skip
    control = next((r for r in runs if r.kind == "control"), None)
    if control is not None and control.top1(args.finetune_epochs) is not None:
        c = control.top1(args.finetune_epochs)
        lines.append(f"- The unshared baseline fine-tuned on the same schedule reaches {c:.2f} %; the best sharified "
                     f"variant is {(best.top1(args.finetune_epochs) or 0.0) - c:+.2f} pp from it (the fair comparison "
                     "when the baseline itself was still improving).")  # fmt: skip
    by = {r.name: r for r in variants_}
    chance = 100.0 / num_classes
    for prefix in ("", "aligned "):
        if f"{prefix}scaled" in by and f"{prefix}average" in by:
            s0, a0 = by[f"{prefix}scaled"].top1(0) or 0.0, by[f"{prefix}average"].top1(0) or 0.0
            near = " (both within 2x of chance, so the difference means little)" if max(s0, a0) < 2 * chance else ""
            verdict = "beats" if s0 > a0 else "does NOT beat"
            lines.append(f"- Before fine-tuning: {prefix}scaled {s0:.2f} % vs {prefix}average {a0:.2f} % "
                         f"-> {prefix}scaled {verdict} {prefix}average{near}.")  # fmt: skip
    for name in ("average", "average + BN recal.", "scaled", "scaled + BN recal."):
        if name in by and f"aligned {name}" in by:
            plain, aligned = by[name], by[f"aligned {name}"]
            lines.append(f"- Channel alignment, {name}: member error {plain.dissimilarity or 0:.3f} -> "
                         f"{aligned.dissimilarity or 0:.3f}; top-1 before fine-tuning {plain.top1(0) or 0:.2f} -> "
                         f"{aligned.top1(0) or 0:.2f} %, after {args.finetune_epochs} epochs "
                         f"{plain.top1(args.finetune_epochs) or 0:.2f} -> "
                         f"{aligned.top1(args.finetune_epochs) or 0:.2f} %.")  # fmt: skip
    at_chance = [r.name for r in variants_ if (r.top1(0) or 0.0) < 2 * chance]
    if at_chance:
        errs = [r.dissimilarity for r in variants_ if r.name in at_chance and r.dissimilarity is not None]
        err_text = f" (member error {min(errs):.2f}-{max(errs):.2f})" if errs else ""
        lines.append(f"- Near chance ({chance:.0f} %) before fine-tuning: {', '.join(at_chance)}{err_text}. Blocks "
                     "trained independently do not have similar filters, so one shared tensor cannot stand in "
                     "for them until fine-tuning (or BatchNorm re-calibration) adapts the rest of the "
                     "network.")  # fmt: skip
    if "random" in by:
        r0 = by["random"].top1(0) or 0.0
        worse = [r.name for r in variants_ if r.name != "random" and (r.top1(0) or 0.0) <= r0]
        verdict = "every other init beats it." if not worse else f"NOT beaten by: {', '.join(worse)}."
        lines.append(f"- Random init before fine-tuning: {r0:.2f} %; {verdict}")
    return lines


def _plot(args: argparse.Namespace, runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    base_acc = runs[0].top1(args.baseline_epochs)
    colours: dict[str, Any] = {}  # an aligned variant: its plain variant's colour, dashed
    for run in runs:
        if run.kind in ("variant", "control"):
            pts = [(m["epoch"], m["top1"]) for m in run.metrics]
            plain = run.name.removeprefix("aligned ")
            if run.kind == "control":
                style: dict[str, Any] = {"color": "k", "ls": ":"}
            else:
                colour = colours.setdefault(plain, f"C{len(colours) % 10}")
                style = {"color": colour, "ls": "--" if plain != run.name else "-"}
            ax1.plot(*zip(*pts), marker="o", label=run.name, **style)
    if base_acc is not None:
        ax1.axhline(base_acc, color="k", ls="--", label="baseline")
    ax1.set(xlabel="fine-tune epochs", ylabel="test top-1 (%)", title="Accuracy after sharifying a trained model")
    ax1.legend(fontsize=8)
    for run in runs:
        final = run.top1(args.finetune_epochs if run.kind in ("variant", "control") else args.baseline_epochs)
        if final is not None:
            ax2.scatter(run.params / 1e3, final, marker="*" if run.kind == "baseline" else "o")
            ax2.annotate(run.name, (run.params / 1e3, final), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set(xlabel="parameters (thousands)", ylabel="test top-1 (%)", title="Accuracy vs parameters (end of training)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.depth, args.width = 14, 8
        args.subset, args.val_subset = 256, 256
        args.baseline_epochs, args.finetune_epochs, args.bn_images = 1, 1, 64
    command = "python -m benchmarks.accuracy_study " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    study = run_study(args)
    write_results(args, study["runs"], study["data"], command.strip(), time.perf_counter() - start)
    print((args.out / "accuracy_study.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
