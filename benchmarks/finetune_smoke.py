"""Wall time of a small Fashion-MNIST run of ``sharify.train.finetune`` on this machine's CPU.

Trains He et al.'s CIFAR ResNet-20 (``cifar_models.cifar_resnet(20, in_chans=1)``) from scratch for
``--epochs`` on a ``--subset`` of Fashion-MNIST (unshared, the baseline), then sharifies the trained
model (average init + BatchNorm re-calibration), evaluates it before any update and fine-tunes it for
the same number of epochs. Writes ``results/finetune_smoke.json`` and ``.md`` (timings, accuracy,
parameters) so the accuracy study can budget its runs.

``--distill`` adds fine-tunes of the same sharified start taught by the trained baseline
(``distill=True``, then also ``distill_features=True``) and writes ``results/finetune_smoke_distill.*``:
the cost of the teacher's extra forward in training images/s. On a shared machine one epoch's rate
is noisy, so the plain and the two distilled fine-tunes run ``--repeats`` times, interleaved, and the
table gives each one's median rate (accuracy from the first repeat).

    python -m benchmarks.finetune_smoke --subset 5000 --epochs 1
    python -m benchmarks.finetune_smoke --subset 2000 --epochs 1 --baseline-epochs 4 --workers 0 --distill
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import sharify
from benchmarks.cifar_models import cifar_resnet
from sharify.train import finetune, load_data

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on CPU too)")
    p.add_argument("--baseline-epochs", type=int, help="epochs of the baseline (default: --epochs)")
    p.add_argument("--distill", action="store_true", help="also fine-tune with distillation from the baseline")
    p.add_argument("--repeats", type=int, default=3, help="with --distill: interleaved repeats of each fine-tune")
    p.add_argument("--out", default="runs/finetune_smoke")
    args = p.parse_args()
    torch.manual_seed(0)
    common = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": "cpu",
        "quiet": True,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "warmup_epochs": 0.2,
        "channels_last": args.channels_last,
    }

    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")  # a fresh run directory each time
    load_avg = os.getloadavg()[0]
    tic = time.perf_counter()
    data = load_data("fashion-mnist", subset=args.subset, val_subset=args.subset)
    load_s = time.perf_counter() - tic

    baseline = cifar_resnet(20, num_classes=10, in_chans=1)
    tic = time.perf_counter()
    base = finetune(baseline, data, out=out / "baseline", **{**common, "epochs": args.baseline_epochs or args.epochs})
    base_s = time.perf_counter() - tic

    tic = time.perf_counter()
    shared = sharify.sharify(base.model.cpu(), example_inputs=torch.zeros(1, 1, 28, 28))
    sharify_s = time.perf_counter() - tic
    tune = {**common, "lr": 0.02, "bn_recalibrate": 512, "eval_before": True, "original": base.model}
    tic = time.perf_counter()
    tuned = finetune(shared, data, out=out / "shared", **tune)
    tune_s = time.perf_counter() - tic

    result = {
        "command": f"python -m benchmarks.finetune_smoke --subset {args.subset} --epochs {args.epochs} "
        f"--workers {args.workers}" + (" --channels-last" if args.channels_last else ""),
        "load_average_at_start": round(load_avg, 2),
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
        "subset": args.subset,
        "epochs": args.epochs,
        "baseline_epochs": args.baseline_epochs or args.epochs,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "data_load_s": round(load_s, 2),
        "baseline": {
            "params": base.final["params"],
            "top1": round(base.final["top1"], 2),
            "wall_s": round(base_s, 1),
            "epoch_s": [round(m["epoch_seconds"], 1) for m in base.metrics],
            "train_images_per_s": round(base.final["images_per_s"], 1),
        },
        "sharify_s": round(sharify_s, 2),
        "shared": {
            "params": tuned.final["params"],
            "top1_before_finetune": round(tuned.metrics[0]["top1"], 2),
            "top1": round(tuned.final["top1"], 2),
            "wall_s": round(tune_s, 1),
            "epoch_s": [round(m["epoch_seconds"], 1) for m in tuned.metrics[1:]],
            "train_images_per_s": round(tuned.final["images_per_s"], 1),
        },
    }
    if args.distill:
        base_epochs = args.baseline_epochs or args.epochs
        result["command"] += f" --baseline-epochs {base_epochs} --distill --repeats {args.repeats}"
        result["distilled"] = _distilled(base.model, data, out, tune, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    name = "finetune_smoke" + ("_channels_last" if args.channels_last else "") + ("_distill" if args.distill else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    b, s = result["baseline"], result["shared"]
    md = (
        f"# Fine-tuning smoke run: CIFAR ResNet-20 (1 channel) on Fashion-MNIST, CPU\n\n"
        f"Command: `{result['command']}` ({args.subset} train / {args.subset} val images, batch {args.batch_size}, "
        f"{args.workers} loader workers, torch threads {result['machine']['cpus']}, "
        f"channels-last {args.channels_last}, "
        f"1-min load average at start {result['load_average_at_start']} on a shared machine).\n\n"
        "| run | params | top-1 before | top-1 after | wall time (s) | s / epoch | train img/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        f"| baseline from scratch, {result['baseline_epochs']} epoch(s) | {b['params']:,} | - | {b['top1']:.2f} | "
        f"{b['wall_s']} | "
        f"{', '.join(map(str, b['epoch_s']))} | {b['train_images_per_s']} |\n"
        f"| sharified (average + BN recal.), {args.epochs} epoch(s) | {s['params']:,} | "
        f"{s['top1_before_finetune']:.2f} | "
        f"{s['top1']:.2f} | {s['wall_s']} | {', '.join(map(str, s['epoch_s']))} | {s['train_images_per_s']} |\n"
    )
    for label, d in result.get("distilled", {}).items():
        md += (
            f"| sharified, {label}, {args.epochs} epoch(s) | {d['params']:,} | {d['top1_before_finetune']:.2f} | "
            f"{d['top1']:.2f} | {d['wall_s']} | {', '.join(map(str, d['epoch_s']))} | {d['train_images_per_s']} |\n"
        )
    if "distilled" in result:
        md += (
            f"\nThe last three rows start from the same sharified model as the row above them; the `--distill` rows "
            "are taught by the baseline (`distill=True`: T = 4, weight 0.9; `distill_features=True`: also the "
            "stage outputs' mean squared error, weight 1) and their training img/s include the teacher's forward. "
            f"Each of the three ran {args.repeats} times, interleaved; img/s is the median (all runs: "
            + "; ".join(f"{k}: {v['train_images_per_s_runs']}" for k, v in result["distilled"].items())
            + "), the other columns are the first run's.\n"
        )
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


def _distilled(
    teacher: torch.nn.Module, data: Any, out: Path, tune: dict[str, Any], repeats: int
) -> dict[str, dict[str, Any]]:
    """Fine-tunes fresh sharified copies of ``teacher``: untaught, taught by its logits, by its logits and stages.

    Each runs ``repeats`` times, interleaved; the rows hold the first repeat's figures and the median rate.
    """
    variants = {
        "no teacher (repeated)": {},
        "--distill": {"teacher": teacher, "distill": True},
        "--distill --distill-features": {"teacher": teacher, "distill": True, "distill_features": True},
    }
    rows: dict[str, dict[str, Any]] = {}
    for r in range(repeats):
        for label, extra in variants.items():
            shared = sharify.sharify(teacher.cpu(), example_inputs=torch.zeros(1, 1, 28, 28))
            tic = time.perf_counter()
            name = re.sub(r"\W+", "_", label).strip("_") + f"-{r}"
            run = finetune(shared, data, out=out / name, **tune, **extra)
            rate = round(run.final["images_per_s"], 1)
            if r:
                rows[label]["train_images_per_s_runs"].append(rate)
                continue
            rows[label] = {
                "params": run.final["params"],
                "top1_before_finetune": round(run.metrics[0]["top1"], 2),
                "teacher_top1": round(run.metrics[0].get("teacher_top1", float("nan")), 2),
                "top1": round(run.final["top1"], 2),
                "wall_s": round(time.perf_counter() - tic, 1),
                "epoch_s": [round(m["epoch_seconds"], 1) for m in run.metrics[1:]],
                "train_images_per_s_runs": [rate],
                **{k: round(run.final[k], 4) for k in ("train_ce", "train_kd", "train_feat") if k in run.final},
            }
    for row in rows.values():
        row["train_images_per_s"] = statistics.median(row["train_images_per_s_runs"])
    return rows


if __name__ == "__main__":
    main()
