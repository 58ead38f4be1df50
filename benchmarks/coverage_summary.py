"""The Markdown summary of a coverage sweep (``coverage.md``), written from the per-model results.

Regenerate it from a sweep's JSON without re-running the sweep::

    python -m benchmarks.coverage_summary benchmarks/results/coverage.json
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchmarks.coverage_check import LINEAR_ONLY
from benchmarks.coverage_sources import SOURCES

__all__ = [
    "OTHER_LINEAR",
    "OTHER_TRANSFORMERS",
    "TRANSFORMER_FAMILIES",
    "errors_of",
    "headline",
    "minivit_headline",
    "summary_markdown",
    "transformer_family",
    "transformer_family_rows",
    "write_summary",
]

_VARIANT_TABLE_MIN_MODELS = 10


def _source(row: dict[str, Any]) -> str:
    return str(row.get("source") or row["library"])  # rows written before sources existed: the library


def _count(results: list[dict[str, Any]], outcome: str) -> int:
    return sum(r["outcome"] == outcome for r in results)


def _minivit(row: dict[str, Any]) -> str:
    return str(row.get("minivit_outcome") or "")  # rows written before the MiniViT pass: ""


def errors_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The models with an ``error`` in either pass (the default options' or the MiniViT pass)."""
    return [r for r in results if r["outcome"] == "error" or _minivit(r) == "error"]


def headline(results: list[dict[str, Any]]) -> str:
    """``N of M torchvision models shared, N of M timm models shared, ..., E errors`` (one part per source,
    and the skipped models when there are any; the errors of both passes)."""
    parts = []
    for source in sorted({_source(r) for r in results}, key=_source_order):
        rows = [r for r in results if _source(r) == source]
        parts.append(f"{_count(rows, 'shared')} of {len(rows)} {source} models shared")
    skipped = _count(results, "skipped")
    parts += [f"{skipped} skipped (missing packages)"] if skipped else []
    errors = len(errors_of(results))
    return ", ".join(parts) + f", {errors} error{'' if errors == 1 else 's'}"


def minivit_headline(results: list[dict[str, Any]]) -> str:
    """``with preset='minivit': N of M torchvision models shared, ...`` (the MiniViT pass, one part per source)."""
    parts = []
    for source in sorted({_source(r) for r in results}, key=_source_order):
        rows = [r for r in results if _source(r) == source]
        parts.append(f"{sum(_minivit(r) == 'shared' for r in rows)} of {len(rows)} {source} models")
    return "with preset='minivit': " + ", ".join(parts) + " shared"


#: The transformer and MLP families of the MiniViT table: (label, globs over the model name); the first match
#: wins (hybrids before ViT). timm's ``vision_transformer_hybrid`` models (``vit_small_r26_s32_224``, ...) are
#: hybrids too.
TRANSFORMER_FAMILIES: list[tuple[str, tuple[str, ...]]] = [
    ("hybrids (`vit_*resnet*`, `*hybrid*`)", ("vit_*resnet*", "*hybrid*")),
    ("ViT (`vit_*`)", ("vit_*",)),
    ("DeiT (`deit*`)", ("deit*",)),
    ("Swin (`swin*`)", ("swin*",)),
    ("CaiT (`cait*`)", ("cait*",)),
    ("BEiT (`beit*`)", ("beit*",)),
    ("EVA (`eva*`)", ("eva*",)),
    ("Mixer (`mixer*`)", ("mixer*",)),
    ("ResMLP (`resmlp*`)", ("resmlp*",)),
    ("PoolFormer (`poolformer*`)", ("poolformer*",)),
]
OTHER_TRANSFORMERS = "other transformers"
OTHER_LINEAR = "other models with Linear branches"
_HYBRID_MODULES = ("timm.vision_transformer_hybrid",)
_FAMILY_SOURCES = ("torchvision", "timm")  # the classification zoos; transformers has its own table


def transformer_family(row: dict[str, Any]) -> str | None:
    """The :data:`TRANSFORMER_FAMILIES` label of a torchvision or timm row; for another model,
    :data:`OTHER_TRANSFORMERS` when the defaults refuse it as linear-only (its residual branches hold Linear
    layers and no conv that a conv selector could share) and :data:`OTHER_LINEAR` when the MiniViT pass shares
    it otherwise (Linear layers beside convs: ConvNeXt's MLPs, MaxViT, ...); ``None`` for the rest (and for the
    other sources)."""
    if _source(row) not in _FAMILY_SOURCES:
        return None
    name = str(row["name"])
    if row["family"] in _HYBRID_MODULES:
        return TRANSFORMER_FAMILIES[0][0]
    for label, globs in TRANSFORMER_FAMILIES:
        if any(fnmatch.fnmatch(name, g) for g in globs):
            return label
    if row["reason_kind"] == LINEAR_ONLY:
        return OTHER_TRANSFORMERS
    if _minivit(row) == "shared":
        return OTHER_LINEAR
    return None


def _mean_reduction(rows: list[dict[str, Any]], key: str) -> str:
    return f"{100 * sum(r[key] for r in rows) / len(rows):.1f}%" if rows else "-"


def _family_row(label: str, rows: list[dict[str, Any]]) -> str:
    minivit = [r for r in rows if _minivit(r) == "shared"]
    best = f"{100 * max(r['minivit_reduction'] for r in minivit):.1f}%" if minivit else "-"
    cells = [
        label,
        len(rows),
        _count(rows, "shared"),
        sum(r["reason_kind"] == LINEAR_ONLY for r in rows),
        len(minivit),
        _mean_reduction(minivit, "minivit_reduction"),
        best,
        sum(r.get("minivit_real_check") == "passed" for r in minivit),
        len(errors_of(rows)),
    ]
    return "| " + " | ".join(map(str, cells)) + " |"


def transformer_family_rows(results: list[dict[str, Any]]) -> list[str]:
    """The rows of the per-family MiniViT table (:data:`TRANSFORMER_FAMILIES`, then the other transformers and
    the transformers source as a whole), header included."""
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if (family := transformer_family(r)) is not None:
            by_family[family].append(r)
    hf = [r for r in results if _source(r) == "transformers"]
    labels = [label for label, _ in TRANSFORMER_FAMILIES] + [OTHER_TRANSFORMERS, OTHER_LINEAR]
    lines = [
        "| family | models | shared (defaults) | refused as linear only | shared (preset='minivit') "
        "| mean reduction (minivit) | max reduction (minivit) | real fwd/bwd passed (minivit) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_family_row(label, by_family[label]) for label in labels if by_family[label]]
    lines += [_family_row("transformers (Hugging Face), every model type", hf)] if hf else []
    return lines


def _source_order(source: str) -> tuple[int, str]:
    return (SOURCES.index(source) if source in SOURCES else len(SOURCES), source)


def _row(label: str, rows: list[dict[str, Any]]) -> str:
    shared = [r for r in rows if r["outcome"] == "shared"]
    best = f"{100 * max(r['reduction'] for r in shared):.1f}%" if shared else "-"
    real = sum(r["real_check"] == "passed" for r in shared)
    reasons = Counter(r["reason_kind"] for r in rows if r["outcome"] == "nothing-to-share")
    why = ", ".join(f"{k} ({n})" for k, n in reasons.most_common())
    counts = [len(rows), len(shared), _count(rows, "nothing-to-share"), _count(rows, "skipped"), len(errors_of(rows))]
    minivit = [r for r in rows if _minivit(r) == "shared"]
    cells = [label, *counts, _mean_reduction(shared, "reduction"), best, real]
    cells += [len(minivit), _mean_reduction(minivit, "minivit_reduction"), why]
    return "| " + " | ".join(map(str, cells)) + " |"


_HEADER = (
    "| {} | models | shared | nothing-to-share | skipped | error | mean reduction (shared) | max reduction "
    "| real fwd/bwd passed | shared (minivit) | mean reduction (minivit) | nothing-to-share reasons |"
    "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
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
        f"MiniViT pass, {minivit_headline(results)} (see [below](#the-minivit-pass-presetminivit)).",
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
        "- MiniViT pass: every model is also planned with `sharify.plan(model, preset='minivit')` (every "
        "`nn.Linear` of the attention and MLP branches of transformer and MLP blocks, shared by runs of two "
        "consecutive blocks: `positions=('all_linear',), group_size=2`), and a model it shares is sharified with "
        "`sharify.sharify(model, preset='minivit')` (report arithmetic checked) and, up to the same size, gets "
        "the same real check. `error` counts an error in either pass.",
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
        *_minivit_section(results),
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
    lines += ["", "## Errors", ""]
    lines += [
        f"- `{_source(r)}:{r['name']}`: {r['reason_kind']}: {r['reason']}"
        if r["outcome"] == "error"
        else f"- `{_source(r)}:{r['name']}` (MiniViT pass): {r['minivit_reason_kind']}: {r['minivit_reason']}"
        for r in errors_of(results)
    ] or ["None."]
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


def _minivit_section(results: list[dict[str, Any]]) -> list[str]:
    """The MiniViT pass: its outcomes, the linear-only refusals it shares, the per-family table and the
    transformers source model by model."""
    ran = [r for r in results if _minivit(r)]
    if not ran:
        return []
    lines = [
        "## The MiniViT pass (preset='minivit')",
        "",
        "| outcome with preset='minivit' | reason | models |",
        "|---|---|---:|",
    ]
    kinds = Counter((_minivit(r), r["minivit_reason_kind"] or "-") for r in ran)
    for (outcome, kind), n in sorted(kinds.items(), key=lambda kv: (kv[0][0] != "shared", -kv[1])):
        lines.append(f"| {outcome} | {kind} | {n} |")
    shared = [r for r in ran if _minivit(r) == "shared"]
    real = Counter(str(r["minivit_real_check"]).split(":")[0] for r in shared)
    linear = [r for r in results if r["reason_kind"] == LINEAR_ONLY]
    linear_shared = [r for r in linear if _minivit(r) == "shared"]
    both = [r for r in shared if r["outcome"] == "shared"]
    lines += [
        "",
        f"{len(ran)} models planned with preset='minivit', {len(shared)} shared (mean reduction "
        f"{_mean_reduction(shared, 'minivit_reduction')}); real forward/backward check: {real.get('passed', 0)} "
        f"passed, {real.get('skipped', 0)} skipped as larger than the limit. Of the {len(linear)} models the "
        f"defaults refuse as `{LINEAR_ONLY}`, preset='minivit' shares {len(linear_shared)}; {len(both)} models "
        "are shared both with the defaults and with preset='minivit' (convs and Linear layers are separate "
        "positions).",
        "",
        "### By transformer and MLP family",
        "",
        "Torchvision and timm classification models, by name (first match: the hybrids, then the families in "
        "order; timm's `vision_transformer_hybrid` models count as hybrids); `other transformers` = any other "
        f"model refused by the defaults as `{LINEAR_ONLY}`; `other models with Linear branches` = any other model "
        "that preset='minivit' shares (Linear layers beside convs: ConvNeXt's MLPs, MaxViT, XCiT, ...). `errors`: "
        "in either pass.",
        "",
        *transformer_family_rows(results),
    ]
    hf = [r for r in results if _source(r) == "transformers"]
    if hf:
        lines += [
            "",
            "### transformers (Hugging Face) model types",
            "",
            "| model type | defaults | preset='minivit' | reduction (minivit) | real fwd/bwd (minivit) |",
            "|---|---|---|---:|---|",
        ]
        for r in hf:
            default = "shared" if r["outcome"] == "shared" else f"{r['outcome']}: {r['reason_kind']}"
            minivit = _minivit(r) if _minivit(r) in ("shared", "") else f"{_minivit(r)}: {r['minivit_reason_kind']}"
            reduction = f"{100 * r['minivit_reduction']:.1f}%" if _minivit(r) == "shared" else "-"
            lines.append(f"| {r['name']} | {default} | {minivit or '-'} | {reduction} | {r['minivit_real_check']} |")
    return [*lines, ""]


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
