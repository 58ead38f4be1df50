"""The Markdown summary of a coverage sweep (``coverage.md``), written from the per-model results.

Regenerate it from a sweep's JSON without re-running the sweep::

    python -m benchmarks.coverage_summary benchmarks/results/coverage.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchmarks.coverage_sources import SOURCES

__all__ = ["headline", "summary_markdown", "write_summary"]

_VARIANT_TABLE_MIN_MODELS = 10


def _source(row: dict[str, Any]) -> str:
    return str(row.get("source") or row["library"])  # rows written before sources existed: the library


def _count(results: list[dict[str, Any]], outcome: str) -> int:
    return sum(r["outcome"] == outcome for r in results)


def headline(results: list[dict[str, Any]]) -> str:
    """``N of M torchvision models shared, N of M timm models shared, ..., E errors`` (one part per source,
    and the skipped models when there are any)."""
    parts = []
    for source in sorted({_source(r) for r in results}, key=_source_order):
        rows = [r for r in results if _source(r) == source]
        parts.append(f"{_count(rows, 'shared')} of {len(rows)} {source} models shared")
    skipped = _count(results, "skipped")
    parts += [f"{skipped} skipped (missing packages)"] if skipped else []
    errors = _count(results, "error")
    return ", ".join(parts) + f", {errors} error{'' if errors == 1 else 's'}"


def _source_order(source: str) -> tuple[int, str]:
    return (SOURCES.index(source) if source in SOURCES else len(SOURCES), source)


def _row(label: str, rows: list[dict[str, Any]]) -> str:
    shared = [r for r in rows if r["outcome"] == "shared"]
    mean = f"{100 * sum(r['reduction'] for r in shared) / len(shared):.1f}%" if shared else "-"
    best = f"{100 * max(r['reduction'] for r in shared):.1f}%" if shared else "-"
    real = sum(r["real_check"] == "passed" for r in shared)
    reasons = Counter(r["reason_kind"] for r in rows if r["outcome"] == "nothing-to-share")
    why = ", ".join(f"{k} ({n})" for k, n in reasons.most_common())
    counts = [len(rows), len(shared), _count(rows, "nothing-to-share"), _count(rows, "skipped"), _count(rows, "error")]
    cells = [label, *counts, mean, best, real, why]
    return "| " + " | ".join(map(str, cells)) + " |"


_HEADER = (
    "| {} | models | shared | nothing-to-share | skipped | error | mean reduction (shared) | max reduction "
    "| real fwd/bwd passed | nothing-to-share reasons |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def summary_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The whole ``coverage.md``."""
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_family[r["family"]].append(r)
    sources = sorted({_source(r) for r in results}, key=_source_order)
    zoos = ["torchvision", "timm"] + (["transformers"] if "transformers" in sources else [])
    lines = [
        f"# Coverage: sharify over the {', '.join(zoos[:-1])} and {zoos[-1]} model zoos",
        "",
        f"**{headline(results)}.**",
        "",
        *_runs(meta),
        "- Sources: torchvision's classification builders and every `timm.list_models()` name; torchvision's "
        "detection, segmentation, video and optical-flow builders (`weights=None`, `weights_backbone=None`, "
        "detectors at `min_size=max_size=128` except SSD); the `transformers` image-classification model types "
        "(`MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`), each config class with its defaults and "
        "`AutoModelForImageClassification.from_config(config)`; `skipped` = needs a package that is not installed. "
        "Video models take 5-D inputs (N, C, T, H, W), optical flow two images and detectors a list of images: "
        "sharify's default example input may not fit them, and the sweep records what `sharify.plan(model)` with "
        "no extra arguments does, as a user would see it.",
        "- Every model is built with random init on the meta device (`with torch.device('meta')`, or, for "
        "builders that compute with tensors such as torchvision's RegNets, with each parameter and buffer moved "
        "to meta as it is registered) and analysed with the default options (`sharify.plan(model)`, "
        "`sharify.sharify(model)`: ShaResNet's rule, the last spatial conv of each block); `shared` means the "
        "plan has groups and `sharify.report(model, shared).params_after == plan.params_after`; "
        "`nothing-to-share` means the library refused the model with a `SharifyError` whose message (the reason, "
        "in the CSV/JSON) says why and what to try; `error` is anything else. "
        f"Shared models up to {int(meta.get('forward_max_params', 0)) / 1e6:.0f} M parameters are also built for "
        "real, sharified (the same groups as on meta are required), run forward and backward on a "
        f"{meta.get('input_px')}-px batch of two (fixed-size timm models at their size, detectors: two images with "
        "a target box each, in training mode, which returns the losses) with the output shapes "
        "compared to the original's and a gradient required on every shared weight. Refused (`nothing-to-share`) "
        "models get no real check whatever their size: `sharify()` raises before it changes anything, so there is "
        "no sharified model to run, and a forward of the unchanged original would test the zoo, not sharify.",
        "- Per-model results: [coverage.csv](coverage.csv), [coverage.json](coverage.json).",
        "",
        "## Outcomes",
        "",
        "| outcome | reason | models | example (the library's message) |",
        "|---|---|---:|---|",
    ]
    kinds = Counter((r["outcome"], r["reason_kind"] or "-") for r in results)
    for (outcome, kind), n in sorted(kinds.items(), key=lambda kv: (kv[0][0] != "shared", -kv[1])):
        example = next((r for r in results if r["outcome"] == outcome and (r["reason_kind"] or "-") == kind), None)
        text = f"`{example['name']}`: {example['reason']}".replace("|", "\\|") if example and example["reason"] else ""
        lines.append(f"| {outcome} | {kind} | {n} | {text} |")
    real = Counter(r["real_check"].split(":")[0] for r in results if r["outcome"] == "shared")
    audited = [r for r in results if r["outcome"] == "nothing-to-share" and r["alternative"]]
    dense = [r for r in audited if not r["alternative"].split("; ")[0].endswith(": nothing")]
    hinted = [r for r in audited if "(suggested)" in r["alternative"]]
    misleading = [r for r in hinted if r.get("misleading_hint")]
    lines += [
        "",
        f"Real forward/backward check of the shared models: {real.get('passed', 0)} passed, "
        f"{real.get('skipped', 0)} skipped as larger than the limit.",
        "",
        f"Audit of the refusals: {len(audited)} refused models have residual stages; planned again with "
        f"`positions='all_spatial'` (any dense spatial conv of the residual branches), {len(dense)} of them would "
        "share something" + (": " + ", ".join(f"`{r['name']}` ({r['alternative']})" for r in dense) if dense else "."),
        "",
        f"Hints: {len(hinted)} refusals suggest options to try (`depthwise=True`, other `positions`, ...); tried, "
        f"the suggestions of {len(misleading)} of them share nothing"
        + (": " + ", ".join(f"`{r['name']}` ({r['alternative']})" for r in misleading) if misleading else "."),
        "",
        "## By source",
        "",
        _HEADER.format("source"),
        *(_row(source, [r for r in results if _source(r) == source]) for source in sources),
        "",
        "## By family",
        "",
        "Family = the module defining the builder (`timm.models.<module>`, `torchvision.models.<module>`), or "
        "`transformers.<model type>`.",
        "",
        _HEADER.format("family"),
    ]
    lines += [_row(f, by_family[f]) for f in sorted(by_family)]
    big = [f for f in sorted(by_family) if len({r["variant"] for r in by_family[f]}) > 1
           and len(by_family[f]) >= _VARIANT_TABLE_MIN_MODELS]  # fmt: skip
    if big:
        lines += [
            "",
            "## By variant within the larger families",
            "",
            "Variant = the model name without its size numbers (`resnet50d` -> `resnetd`, "
            "`seresnext26d_32x4d` -> `seresnextd`).",
        ]
        for f in big:
            variants: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in by_family[f]:
                variants[r["variant"]].append(r)
            lines += ["", f"### {f}", "", _HEADER.format("variant")]
            lines += [_row(v, variants[v]) for v in sorted(variants)]
    errors = [r for r in results if r["outcome"] == "error"]
    lines += ["", "## Errors", ""]
    lines += [f"- `{_source(r)}:{r['name']}`: {r['reason_kind']}: {r['reason']}" for r in errors] or ["None."]
    skipped = [r for r in results if r["outcome"] == "skipped"]
    lines += ["", "## Skipped (missing packages)", ""]
    lines += [f"- `{_source(r)}:{r['name']}`: {r['reason']}" for r in skipped] or ["None."]
    review = [r for r in results if r["outcome"] == "nothing-to-share" and r.get("repeated_dense_convs")]
    lines += [
        "",
        "## Refusals with repeated dense spatial convs",
        "",
        "Models refused although some dense (not depthwise) spatial convs share a signature somewhere in the "
        "model; sharing needs two of them in consecutive residual blocks of one shape. `alternative` is what "
        "`positions='all_spatial'` (every dense spatial conv of the branches) and the option the refusal suggests, "
        "if any, would share.",
        "",
        "| model | reason | repeated dense convs | alternative |",
        "|---|---|---:|---|",
    ]
    lines += [
        f"| {_source(r)}:{r['name']} | {r['reason_kind']} | {r['repeated_dense_convs']} | {r['alternative']} |"
        for r in review
    ]
    partial = [r for r in results if r.get("convs_without_shape")]
    lines += ["", "## Models whose shape propagation stopped before some convs", ""]
    lines += [
        f"- `{_source(r)}:{r['name']}` ({r['outcome']}): {r['convs_without_shape']} conv calls not analysed"
        for r in partial
    ] or ["None."]
    auto = [r for r in results if r["traced"].startswith("auto-leaf")]
    lines += ["", "## Models traced with automatically leafed submodules", ""]
    lines += [f"- `{_source(r)}:{r['name']}` ({r['outcome']}): {r['traced'][len('auto-leaf: ') :]}" for r in auto]
    lines += [] if auto else ["None."]
    return "\n".join(lines) + "\n"


def _run_lines(run: dict[str, Any], label: str) -> list[str]:
    wall = float(run.get("wall_seconds", 0))
    hf = f", transformers {run['transformers']}" if run.get("transformers") else ""
    return [
        f"- {label}: `{run.get('command', '')}`",
        f"  - Wall time: {wall:.0f} s ({wall / 60:.1f} min) on {run.get('machine', '?')}",
        f"  - Versions: torch {run.get('torch')}, torchvision {run.get('torchvision')}, timm {run.get('timm')}{hf}, "
        f"Python {run.get('python')} ({run.get('date')})",
    ]


def _runs(meta: dict[str, Any]) -> list[str]:
    """The command, wall time and versions of the run, and of each run merged into it (``--merge``)."""
    merged = meta.get("merged_runs", [])
    lines = _run_lines(
        meta, "Command" if not merged else f"Command ({', '.join(meta.get('sources', ['torchvision', 'timm']))})"
    )
    for run in merged:
        models = ", ".join(f"{source} {n}" for source, n in run.get("models", {}).items())
        lines += _run_lines(run, f"Merged (rows from this run: {models})")
    return lines


def write_summary(results: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """Writes :func:`summary_markdown` to ``path``."""
    path.write_text(summary_markdown(results, meta))


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/coverage.json")
    data = json.loads(source.read_text())
    write_summary(data["models"], data["meta"], source.with_suffix(".md"))
