"""The table, targets and plot of ``benchmarks.pareto`` from its ``pareto.json`` (``--from-json`` reruns only this)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["best", "targets", "write_report"]


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def best(row: dict[str, Any]) -> float | None:
    """The row's top-1 after the fine-tune, with or without distillation, whichever is higher."""
    values = [v for v in (row.get("finetuned"), row.get("distilled")) if v is not None]
    return max(values) if values else None


def _table(rows: list[dict[str, Any]], baseline: int) -> list[str]:
    lines = [
        "| model | method | parameters | of baseline | before fine-tuning | after BN re-cal. | fine-tuned | "
        "fine-tuned + distill |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["params"]:
            lines.append(f"| {r['name']} | {r['method']} | | | {r['note']} | | | |")
            continue
        share = f"{r['params'] / baseline:.1%}"
        lines.append(
            f"| {r['name']} | {r['method']} | {r['params']:,} | {share} | {_pct(r['before'])} | "
            f"{_pct(r['recalibrated'])} | {_pct(r['finetuned'])} | {_pct(r['distilled'])} |"
        )
    return lines


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's three targets, checked on one depth's rows (each line says met / not met and why)."""
    base = next(r for r in rows if r["method"] == "baseline")
    shared = [r for r in rows if r["method"] == "sharify" and r["params"]]
    out = []
    quarter = [r for r in shared if r["params"] <= 0.75 * base["params"]]
    if quarter:
        r = max(quarter, key=lambda r: r["params"])
        top = max(v for v in (r["before"], r["recalibrated"]) if v is not None)
        ok = top >= base["before"] - 1.0
        share = r["params"] / base["params"]
        out.append(f"- before fine-tuning, at 25 % fewer parameters ({r['name']}, {share:.1%}): {top:.2f} vs "
                   f"baseline {base['before']:.2f} -> {'met' if ok else 'not met'} (within 1 pp)")  # fmt: skip
    for p in (r for r in rows if r["method"] == "torch-pruning"):
        # sharify's best variant no larger than the pruned model (a smaller model that is as good counts)
        at = p["name"].removeprefix("L1 pruning at ")
        fits = [r for r in shared if best(r) is not None and r["params"] <= max(p["params"], _params_of(shared, at))]
        mine = max(fits, key=lambda r: best(r), default=None)  # type: ignore[arg-type, return-value]
        scratch = next((r for r in rows if r["method"] == "scratch" and r["name"].endswith(f"(at {at})")), None)
        if mine is None or best(p) is None:
            continue
        rivals = [("Torch-Pruning", best(p))] + ([("from scratch", best(scratch))] if scratch else [])
        verdict = all(best(mine) >= v for _, v in rivals if v is not None)  # type: ignore[operator]
        against = ", ".join(f"{n} {v:.2f}" for n, v in rivals if v is not None)
        out.append(f"- after fine-tuning at {at} ({p['params']:,} params pruned): sharify's best no larger, "
                   f"{mine['name']} ({mine['params']:,}), {best(mine):.2f} vs {against} -> "
                   f"{'met' if verdict else 'not met'}")  # fmt: skip
    budgets = [r for r in shared if "param_budget" in r["name"] and r["distilled"] is not None]
    aggressive = min(budgets, key=lambda r: r["params"], default=None)
    if aggressive is not None:
        plain, distilled = aggressive["finetuned"], aggressive["distilled"]
        out.append(f"- distillation at the most aggressive budget ({aggressive['name']}): {plain:.2f} -> "
                   f"{distilled:.2f} with distill -> {'met' if distilled > plain else 'not met'}")  # fmt: skip
    return out


def _params_of(rows: list[dict[str, Any]], name: str) -> int:
    return next((r["params"] for r in rows if r["name"] == name), 0)


def _plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in payload["rows"]})
    fig, axes = plt.subplots(1, len(depths), figsize=(6 * len(depths), 4.5), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        rows = [r for r in payload["rows"] if r["depth"] == depth and r["params"]]
        lines = {
            "sharify (fine-tuned)": [r for r in rows if r["method"] == "sharify" and "basis" not in r["name"]],
            "Torch-Pruning L1 (fine-tuned)": [r for r in rows if r["method"] == "torch-pruning"],
            "narrower net from scratch": [r for r in rows if r["method"] == "scratch"],
        }
        for label, group in lines.items():
            pts = sorted((r["params"], best(r)) for r in group if best(r) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        basis = [(r["params"], best(r)) for r in rows if "basis" in r["name"] and best(r) is not None]
        if basis:
            ax.scatter(*zip(*basis), marker="s", color="k", label="sharify filter basis", zorder=3)
        for r in rows:
            if r["method"] in ("baseline", "control"):
                value = r["before"] if r["method"] == "baseline" else r["finetuned"]
                ax.axhline(value, ls="--" if r["method"] == "baseline" else ":", color="grey", lw=1,
                           label=f"{r['method']} {value:.2f}")  # fmt: skip
        ax.set(title=f"ResNet-{depth}, Fashion-MNIST", xlabel="parameters", ylabel="top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _part_line(part: dict[str, Any]) -> str:
    data, args = part["data"], part["args"]
    return (
        f"Command: `{part['command'].strip()}` ({part['seconds'] / 60:.0f} min for the whole command; "
        f"git commit `{part['git_commit']}`). "
        f"Fashion-MNIST ({data['source']}): {data['train_images']:,} training and {data['val_images']:,} test "
        f"images; baseline {args['baseline_epochs']} epochs at lr {args['lr']}, every fine-tune "
        f"{args['finetune_epochs']} epochs at lr {args['finetune_lr']}; seed {args['seed']}."
    )


def write_report(payload: dict[str, Any], out: Path) -> None:
    """Writes ``pareto.md`` and ``pareto.png`` in ``out`` from a (merged) ``pareto.json`` payload."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Accuracy per parameter: sharify against Torch-Pruning and smaller nets from scratch",
        "",
        "Top-1 in % on the test images; one seed, so differences of a few tenths are noise. Every row of a depth "
        "starts from that depth's one trained baseline and uses one fine-tune schedule.",
        "",
    ]
    for depth in sorted({r["depth"] for r in payload["rows"]}):
        rows = [r for r in payload["rows"] if r["depth"] == depth]
        base = next(r for r in rows if r["method"] == "baseline")
        part = payload["parts"][base.get("part", 0)]
        lines += [f"## ResNet-{depth}", "", _part_line(part), "", *_table(rows, base["params"]), "", "Targets:", "",
                  *targets(rows), ""]  # fmt: skip
    (out / "pareto.md").write_text("\n".join(lines))
    _plot(payload, out / "pareto.png")
