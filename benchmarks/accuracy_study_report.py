"""The accuracy study's results as a table and a plot, made from ``study.json`` alone (no training).

``python -m benchmarks.accuracy_study`` writes ``study.json`` and then calls :func:`write_report`;
``python -m benchmarks.accuracy_study --from-json STUDY_JSON`` calls it on committed results, so the table's
wording can change without rerunning the study.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """One training run of the study, as ``study.json`` stores it."""

    name: str
    kind: str  # "baseline" | "control" | "variant" | "scratch"
    params: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    #: Mean over groups of ``sharify.report``'s relative error of the members against what the shared
    #: model computes in their place, right after sharifying (variants only).
    dissimilarity: float | None = None
    #: Weight of the orthogonality regulariser in training (``None`` in results written before it was recorded).
    lambda_r: float | None = None

    def top1(self, epoch: int) -> float | None:
        return next((m["top1"] for m in self.metrics if m["epoch"] == epoch), None)


def run_dir_name(name: str) -> str:
    """The directory under ``runs/`` of the run called ``name``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def lambda_r(options: dict[str, Any], args: argparse.Namespace) -> float:
    """The orthogonality regulariser's weight for a run with these sharify options: only basis models have one."""
    return args.lambda_r if options.get("method") == "basis" else 0.0


def write_report(study: dict[str, Any], out: Path) -> None:
    """``accuracy_study.md`` and ``accuracy_study.png`` in ``out`` from a ``study.json`` payload (no training)."""
    args, runs = study_args(study), [Run(**r) for r in study["runs"]]
    (out / "accuracy_study.md").write_text(render_markdown(study, out))
    plot(args, runs, out / "accuracy_study.png")


def study_args(study: dict[str, Any]) -> argparse.Namespace:
    """The settings a study ran with, typed again (``study.json`` stores them as strings)."""
    saved = study["args"]
    ints = ("depth", "width", "subset", "val_subset", "baseline_epochs", "finetune_epochs", "batch_size", "bn_images",
            "shared_rank", "unique_rank", "seed")  # fmt: skip
    floats = ("lr", "finetune_lr", "weight_decay", "lambda_r")
    return argparse.Namespace(**{k: int(saved[k]) for k in ints}, **{k: float(saved[k]) for k in floats})


def study_data(study: dict[str, Any], out: Path) -> dict[str, Any]:
    """Source and sizes of the data: recorded in ``study.json``; for studies written before it was, the
    baseline run's ``config.json`` (``finetune`` records them there)."""
    if "data" in study:
        return study["data"]
    setup = json.loads((out / "runs" / run_dir_name(study["runs"][0]["name"]) / "config.json").read_text())["setup"]
    return {"source": setup["data"], "train_images": setup["train_images"], "val_images": setup["val_images"],
            "classes": setup["classes"]}  # fmt: skip


def run_lambda_r(run: Run, args: argparse.Namespace) -> float:
    """The orthogonality weight a run trained with (recorded, or what :func:`_train` passes for its options)."""
    return run.lambda_r if run.lambda_r is not None else lambda_r(run.options, args)


def render_markdown(study: dict[str, Any], out: Path) -> str:
    """The text of ``accuracy_study.md`` from a ``study.json`` payload (``out``: where it lies)."""
    args, runs, data = study_args(study), [Run(**r) for r in study["runs"]], study_data(study, out)
    machine = study["machine"]
    base = runs[0]
    base_acc = base.top1(args.baseline_epochs) or 0.0
    epochs = sorted({0, 1, 2, args.finetune_epochs} & set(range(args.finetune_epochs + 1)))
    commit = study.get("git_commit")
    regularised: dict[float, list[str]] = {}
    for run in runs:
        regularised.setdefault(run_lambda_r(run, args), []).append(run.name)
    with_r = [f"lambda_r = {lam:g} in the training of {', '.join(names)}" for lam, names in regularised.items() if lam]
    regulariser = (
        f"Orthogonality regulariser (`sharify.orthogonality_loss`, the paper's lambda_R): {'; '.join(with_r)}; "
        "0 in every other run (each run's `runs/*/config.json` records its value)."
        if with_r
        else "No run trains with the orthogonality regulariser (lambda_r = 0 everywhere)."
    )
    lines = [
        "# Accuracy study: sharify on a trained ResNet, Fashion-MNIST, CPU",
        "",
        f"Command: `{study['command']}`  ",
        *([f"Code: git commit `{commit}`.  "] if commit else []),
        f"Total wall time: {study['seconds'] / 60:.1f} min on {machine['cpu_count']} CPU cores "
        f"(load average at the end: {machine['load_avg_at_end']}).",
        "",
        f"Data: Fashion-MNIST ({data['train_images']:,} train / {data['val_images']:,} test images, "
        f"{data['source']}). Model: CIFAR ResNet-{args.depth} (width {args.width}, 1 input channel). Seed {args.seed}.",
        f"Baseline: {args.baseline_epochs} epochs from scratch, SGD (timm, Nesterov) lr {args.lr} cosine, batch "
        f"{args.batch_size}, weight decay {args.weight_decay}, random crop + flip. Fine-tuning: {args.finetune_epochs} "
        f"epochs, same recipe with lr {args.finetune_lr}; accuracy is top-1 on the test set after each epoch "
        "(epoch 0 = right after sharifying, before any update).",
        regulariser,
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
    summary = _summary(args, runs, base_acc, data)
    lines += ["", "## Findings (computed from the table)", "", *summary]
    return "\n".join(lines) + "\n"


def _summary(args: argparse.Namespace, runs: list[Run], base_acc: float, data: dict[str, Any]) -> list[str]:
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
        c = control.top1(args.finetune_epochs) or 0.0
        images = f"a subset of {data['train_images']:,}" if args.subset else f"all {data['train_images']:,}"
        converged = "is not converged" if c > base_acc else "gains nothing more"
        lines.append(f"- The baseline ({base_acc:.2f} %) is trained on {images} training images for "
                     f"{args.baseline_epochs} epochs and {converged}: the control, the unshared baseline fine-tuned "
                     f"on the same schedule, reaches {c:.2f} % ({c - base_acc:+.2f} pp). The fair comparison is "
                     f"the control: the best sharified variant is "
                     f"{(best.top1(args.finetune_epochs) or 0.0) - c:+.2f} pp from it.")  # fmt: skip
    by = {r.name: r for r in variants_}
    chance = 100.0 / data["classes"]
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


def plot(args: argparse.Namespace, runs: list[Run], path: Path) -> None:
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
