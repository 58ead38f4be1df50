"""Deployment of sharified models: file sizes and ONNX Runtime latency against the originals (issue 17).

    python -m benchmarks.deploy            # the committed run (CPU, 2 cores shared with other jobs: ~20 min)
    python -m benchmarks.deploy --quick    # smoke run: one tiny model, batch 1, 3 rounds (written to a temp dir)
    python -m benchmarks.deploy --aoti     # also AOTInductor packages (a C++ build per model: slow)

For each model (BatchNorm statistics randomised like a trained network's, so that a per-member fold would
show): the bytes of the shared and the original model as safetensors (:func:`sharify.save`), ONNX
(:func:`sharify.export_onnx`) and ``.pt2`` (``torch.export.save``, through
:func:`sharify.deploy.check_export`), and both quantised by :func:`sharify.quantize_int8` (weight-only int8,
per-output-channel scales) as safetensors (``safetensors.torch.save`` of the state_dict) and as int8 ONNX
(:func:`sharify.export_onnx`: QDQ, one int8 initializer per weight, checked), each ratio shared/original
against the parameter fraction (``params_after / params_before`` of :func:`sharify.report`); the ONNX Runtime
latency ratio shared/original at batch 1 and 8 (int8: shared int8 / original int8), measured interleaved as in
:mod:`benchmarks.perf` (the median of the per-round ratios with its distribution-free 95 % confidence
interval); the largest difference between ONNX Runtime's and PyTorch's outputs of the shared model, float and
int8. Targets: every shared file within 2 % of the parameter fraction; latency ratio <= 1.05. ONNX Runtime
runs single-threaded by default (``--threads``), which keeps the ratio steady on a small shared machine.

Optional column (it appears when the function exists in ``sharify.deploy``): ``fold_batchnorm`` (BatchNorm
folded into per-member scale/bias after the shared conv): the ONNX bytes and latency of the shared model so
transformed.

Results go to ``benchmarks/results/deploy.md`` and ``deploy.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import torchvision
from safetensors.torch import save as save_safetensors
from torch import nn

import sharify
from benchmarks.cifar_models import wide_resnet
from benchmarks.perf import interleaved, machine, median_ci, verdict
from sharify.deploy import check_export, check_onnx
from sharify.errors import ExportError

RESULTS = Path(__file__).parent / "results"
#: Targets of the issue: each shared file's byte ratio within 2 % of the parameter fraction; latency ratio <= 1.05.
BYTES_TOLERANCE = 0.02
LATENCY_TARGET = 1.05
MODELS = ["resnet18", "resnet34", "resnet50", "wrn-40-4", "resnet34-dsfb-basis"]


def optional_transforms() -> dict[str, Callable[[nn.Module], nn.Module]]:
    """The deployment transforms of ``sharify.deploy`` this checkout has, by column name (a column is skipped,
    and the Markdown says so, while its function is absent)."""
    found: dict[str, Callable[[nn.Module], nn.Module]] = {}
    try:
        from sharify.deploy import fold_batchnorm

        found["folded-bn"] = fold_batchnorm
    except ImportError:
        pass
    return found


OPTIONAL = ("folded-bn",)
#: The file formats of the bytes table, in order: float, then quantised by ``sharify.quantize_int8``.
FORMATS = ["safetensors", "onnx", "pt2", "safetensors-int8", "onnx-int8"]
#: The model each latency variant is timed against (the original in the same format).
BASELINE = {"shared": "original", "folded-bn": "original", "int8": "original-int8"}


def trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters of a trained network's kind (each channel its own scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model


def build(name: str) -> tuple[nn.Module, nn.Module, tuple[int, int, int]]:
    """The original (eval mode), its sharified copy and the input's (C, H, W)."""
    torch.manual_seed(0)
    chw = (3, 128, 128)
    if name.startswith("wrn-"):  # CIFAR wide ResNet (pre-activation), e.g. wrn-40-4
        depth, k = map(int, name[4:].split("-"))
        original, chw = wide_resnet(depth, k), (3, 32, 32)
    else:
        original = torchvision.models.get_model(name.removesuffix("-dsfb-basis"))
    original = trained_statistics(original).eval()
    x = torch.zeros(1, *chw)
    if name.endswith("-dsfb-basis"):
        shared = sharify.sharify(original, example_inputs=x, preset="dsfb-basis", shared_rank=48, unique_rank=1)
    else:
        shared = sharify.sharify(original, example_inputs=x)
    return original, shared.eval(), chw


def _session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _bytes_row(original: int, shared: int, fraction: float) -> dict[str, Any]:
    ratio = shared / original
    off = ratio / fraction - 1
    return {"original_bytes": original, "shared_bytes": shared, "ratio": ratio, "off_fraction": off,
            "verdict": "met" if abs(off) <= BYTES_TOLERANCE else "missed"}  # fmt: skip


def latency_verdict(ratio: float, ci: tuple[float, float]) -> str:
    """``perf.verdict`` for a ratio that must stay *under* the target: ``met`` (median <= 1.05), ``noise``
    (above, but the interval reaches it) or ``above`` (the whole interval over it). Negated, "<= target" is
    perf's ">= target"."""
    found = verdict(-ratio, (-ci[1], -ci[0]), -LATENCY_TARGET)
    return "above" if found == "below" else found


def _runner(session: onnxruntime.InferenceSession, x: np.ndarray, calls: int) -> Callable[[], None]:
    feed = {session.get_inputs()[0].name: x}

    def run() -> None:
        for _ in range(calls):
            session.run(None, feed)

    return run


def dequantize_linear_nodes(path: Path) -> int:
    """``DequantizeLinear`` nodes in the ONNX file."""
    import onnx

    return sum(n.op_type == "DequantizeLinear" for n in onnx.load(str(path)).graph.node)


def batchnorms_left(path: Path) -> tuple[int, int]:
    """BatchNormalization ops in the file, and left in the graph ONNX Runtime runs after its optimisations."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        options.log_severity_level = 3
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    count = lambda model: sum(n.op_type == "BatchNormalization" for n in model.graph.node)  # noqa: E731
    return count(onnx.load(str(path))), count(optimized)


def latency(name: str, files: dict[str, Path], chw: tuple[int, ...], args: argparse.Namespace) -> list[dict[str, Any]]:
    """ONNX Runtime latency of each file against the original's, interleaved, at each batch size."""
    sessions = {label: _session(path, args.threads) for label, path in files.items()}
    rows = []
    for batch in args.batches:
        x = np.random.default_rng(0).standard_normal((batch, *chw), dtype=np.float32)
        calls = max(1, 8 // batch)  # a round of batch 1 runs 8 calls: a preempted call weighs less
        fns = {label: _runner(s, x, calls) for label, s in sessions.items()}
        times = {k: [t / calls for t in v] for k, v in interleaved(fns, torch.device("cpu"), args.warmup,
                                                                      args.repeats).items()}  # fmt: skip
        for label in files:
            if label not in BASELINE:
                continue
            base = BASELINE[label]
            paired = [s / o for s, o in zip(times[label], times[base], strict=True)]
            ratio, ci = statistics.median(paired), median_ci(paired)
            rows.append({
                "model": name, "variant": label, "baseline": base, "batch": batch, "ratio": ratio,
                "ratio_ci95": list(ci), "verdict": latency_verdict(ratio, ci),
                "original_ms": 1e3 * statistics.median(times[base]),
                "variant_ms": 1e3 * statistics.median(times[label]),
                "repeats": args.repeats, "warmup": args.warmup, "calls_per_round": calls,
            })  # fmt: skip
            print(f"{name:22s} {label:10s} batch {batch}: latency ratio {ratio:.3f} "
                  f"(95% CI {ci[0]:.3f}-{ci[1]:.3f}) {rows[-1]['verdict']}", flush=True)  # fmt: skip
    return rows


def file_sizes(model: nn.Module, label: str, x: torch.Tensor, work: Path, aoti: bool) -> dict[str, int]:
    """Bytes of ``model``'s files by format (:data:`FORMATS`), written to ``work`` as ``{label}.*`` (the ONNX files
    checked by ``export_onnx``: each shared tensor once, int8 ones as int8, outputs equal in ONNX Runtime)."""
    sharify.save(model, work / f"{label}.safetensors")
    sharify.export_onnx(model, work / f"{label}.onnx", x)
    pt2 = check_export(model, x, path=work / f"{label}.pt2", aoti=aoti)
    q = sharify.quantize_int8(model)
    sharify.export_onnx(q, work / f"{label}-int8.onnx", x)
    int8_state = {k: v.contiguous() for k, v in q.state_dict().items()}
    size = {"safetensors": (work / f"{label}.safetensors").stat().st_size,
            "onnx": (work / f"{label}.onnx").stat().st_size, "pt2": pt2.package_bytes,
            "safetensors-int8": len(save_safetensors(int8_state)),
            "onnx-int8": (work / f"{label}-int8.onnx").stat().st_size}  # fmt: skip
    if pt2.aoti_bytes is not None:
        size["aoti"] = pt2.aoti_bytes
    return size


def ort_difference(model: nn.Module, path: Path, chw: tuple[int, ...], threads: int) -> tuple[float, float]:
    """Largest difference between ONNX Runtime's outputs of ``path`` and ``model``'s on a batch of 8, and the largest
    output."""
    x8 = torch.randn(8, *chw, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(x8).numpy()
    session = _session(path, threads)
    got = session.run(None, {session.get_inputs()[0].name: x8.numpy()})[0]
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


def measure(name: str, args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    original, shared, chw = build(name)
    report = sharify.report(original, shared)
    fraction = report.params_after / report.params_before
    x = torch.randn(1, *chw)
    row: dict[str, Any] = {"model": name, "input": list(chw), "params_before": report.params_before,
                           "params_after": report.params_after, "param_fraction": fraction, "files": {}}  # fmt: skip
    size = {label: file_sizes(model, label, x, work, args.aoti) for label, model in (("original", original),
            ("shared", shared))}  # fmt: skip
    for fmt in size["shared"]:
        row["files"][fmt] = _bytes_row(size["original"][fmt], size["shared"][fmt], fraction)
    check = check_onnx(shared, work / "shared.onnx", x)
    row["onnx_check"] = {"shared_tensors": len(check.tensors), "max_copies": max((c.count for c in check.tensors),
                         default=0), "stored_elements": check.stored_elements, "params": check.params}  # fmt: skip
    shared_int8 = sharify.quantize_int8(shared)
    check = check_onnx(shared_int8, work / "shared-int8.onnx", x)
    row["onnx_int8_check"] = {"shared_tensors": len(check.tensors), "max_copies": max((c.count for c in
                              check.tensors), default=0), "int8_elements": check.int8_elements,
                              "int8_weights": check.int8_buffers, "dequantize_linear": dequantize_linear_nodes(
                              work / "shared-int8.onnx")}  # fmt: skip
    row["max_abs_diff"], row["max_abs_output"] = ort_difference(shared, work / "shared.onnx", chw, args.threads)
    row["int8_max_abs_diff"], row["int8_max_abs_output"] = ort_difference(shared_int8, work / "shared-int8.onnx",
                                                                          chw, args.threads)  # fmt: skip
    row["batchnorms"] = dict(zip(("file", "after_ort_optimisation"), batchnorms_left(work / "shared.onnx")))
    files = {"original": work / "original.onnx", "shared": work / "shared.onnx",
             "original-int8": work / "original-int8.onnx", "int8": work / "shared-int8.onnx"}  # fmt: skip
    row["optional"] = {}
    for label, transform in optional_transforms().items():  # OPTIONAL HOOKS (see optional_transforms)
        try:
            variant = transform(copy.deepcopy(shared)).eval()
            path = sharify.export_onnx(variant, work / f"{label}.onnx", x, check=False)
            problems = []
            try:
                check_onnx(variant, path, x)
            except ExportError as exc:
                problems.append(str(exc))
            row["optional"][label] = {**_bytes_row(size["original"]["onnx"], path.stat().st_size, fraction),
                                      "check": problems[0] if problems else "passed"}  # fmt: skip
            files[label] = path
        except Exception as exc:  # a column must not stop the run; its error is recorded
            row["optional"][label] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({k: v for k, v in row.items() if k != "optional"}), flush=True)
    return row, latency(name, files, chw, args)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def int8_latency_line(lat: list[dict[str, Any]]) -> list[str]:
    """The markdown's line on the int8 rows' latency against the original's int8 file (none without int8 rows)."""
    rows = [r for r in lat if r["variant"] == "int8"]
    if not rows:
        return []
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("met", "noise", "above")}
    return [f"int8 (shared int8 / original int8, ratio <= {LATENCY_TARGET}): {counts['met']} of {len(rows)} rows "
            f"met; {counts['noise']} above it by less than this machine's noise; {counts['above']} measurably above.",
            ""]  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    m, rows, lat = results["machine"], results["models"], results["latency"]
    formats = list(rows[0]["files"]) if rows else []
    names = {"safetensors": "safetensors", "onnx": "ONNX", "pt2": ".pt2", "safetensors-int8": "int8 safetensors",
             "onnx-int8": "int8 ONNX (QDQ)", "aoti": "AOTI .pt2"}  # fmt: skip
    lines = [
        "# Deployment: file sizes and ONNX Runtime latency of sharified models",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores; ONNX Runtime {results['versions']['onnxruntime']} "
        f"({results['settings']['threads']} thread), onnx {results['versions']['onnx']}, onnxscript "
        f"{results['versions']['onnxscript']}; Python {m['python']}, torch {m['torch']}, torchvision "
        f"{m['torchvision']}, sharify {m['sharify']}.",
        "",
        "BatchNorm statistics are randomised like a trained network's (a per-member fold of BatchNorm into the shared "
        "conv would give each member its own copy; with default statistics such copies are equal and merge). ONNX "
        "files come from `sharify.export_onnx` (torch's `torch.export`-based exporter; each file passed the check: "
        "one initializer per shared tensor, outputs equal to PyTorch's), `.pt2` packages from `torch.export.save` "
        "(checked by `sharify.deploy.check_export`), safetensors from `sharify.save`. The int8 columns quantise "
        "both models with `sharify.quantize_int8` (weight-only, one scale per output channel; each shared tensor "
        "quantised once) and compare the shared file with the original's quantised the same way: safetensors of the "
        "state_dict, and ONNX from `sharify.export_onnx` in QDQ form (each weight one int8 initializer read by "
        "`DequantizeLinear`, checked: one int8 initializer per shared tensor, int8 elements equal to the model's int8 "
        "weights, outputs equal to the int8 PyTorch model's).",
        "",
        f"## File bytes (MB, shared / original; target: ratio within {BYTES_TOLERANCE:.0%} of the parameter fraction)",
        "",
        "| model | input | params before | params after | param fraction | "
        + "".join(f"{names[f]} | " for f in formats),
        "|---|---|---|---|---|" + "---|" * len(formats),
    ]
    for r in rows:
        cells = [f"{_mb(f['shared_bytes'])} / {_mb(f['original_bytes'])} = {f['ratio']:.4f} ({f['off_fraction']:+.2%}, "
                 f"{f['verdict']})" for f in r["files"].values()]  # fmt: skip
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['params_before']:,} | "
                     f"{r['params_after']:,} | {r['param_fraction']:.4f} | " + " | ".join(cells) + " |")  # fmt: skip
    files = [f for r in rows for f in r["files"].values()]
    met = sum(f["verdict"] == "met" for f in files)
    lines += ["", f"Bytes target (within {BYTES_TOLERANCE:.0%} of the parameter fraction): {met} of {len(files)} "
              "shared files met.", ""]  # fmt: skip
    lines += [
        f"## ONNX Runtime latency (ms; ratio = shared / original, target <= {LATENCY_TARGET})",
        "",
        "The ratio is the median of the per-round ratios (the models of a round run back to back, the order "
        "alternating; a round of batch 1 times 8 calls of each), with the distribution-free 95% confidence interval "
        "of that median. Each variant is timed against the original in its own format: `shared` and `folded-bn` "
        "against the float original, `int8` (the shared model's int8 QDQ file) against the original's int8 QDQ file.",
        "",
        "| model | variant | batch | baseline | baseline ms | variant ms | ratio | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lat:
        low, high = r["ratio_ci95"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r.get('baseline', 'original')} | "
                     f"{r['original_ms']:.2f} | {r['variant_ms']:.2f} | {r['ratio']:.3f} | {low:.3f}-{high:.3f} | "
                     f"{r['verdict']} |")  # fmt: skip
    shared_rows = [r for r in lat if r["variant"] == "shared"]
    counts = {v: sum(r["verdict"] == v for r in shared_rows) for v in ("met", "noise", "above")}
    lines += [
        "",
        f"Latency target (ratio <= {LATENCY_TARGET}): {counts['met']} of {len(shared_rows)} rows met; "
        f"{counts['noise']} above it by less than this machine's noise; {counts['above']} measurably above.",
        "",
        *int8_latency_line(lat),
        "## Outputs: ONNX Runtime against PyTorch (shared model, batch 8)",
        "",
        "A BatchNorm after a shared conv stays a BatchNormalization op in the file (folding it would give each member "
        "its own weight); ONNX Runtime folds it into the conv when it loads the file, in memory, and so runs the "
        "original's graph. The last column counts BatchNormalization ops in the file and left after ONNX Runtime's "
        "optimisations (a pre-activation net's BatchNorms come before its convs and stay).",
        "",
        "The int8 columns compare the int8 QDQ file in ONNX Runtime with the int8 PyTorch model (the same "
        "dequantised weights), and count its `DequantizeLinear` nodes (one per int8 weight: the members of a shared "
        "tensor read the output of one) and its int8 elements against the model's int8 weights.",
        "",
        "| model | max abs difference | max abs output | relative | BatchNormalization ops: file / run "
        "| int8: max abs difference | relative | DequantizeLinear | int8 elements: file / model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = r["max_abs_diff"] / r["max_abs_output"] if r["max_abs_output"] else 0.0
        bn, q = r["batchnorms"], r["onnx_int8_check"]
        rel8 = r["int8_max_abs_diff"] / r["int8_max_abs_output"] if r["int8_max_abs_output"] else 0.0
        lines.append(f"| {r['model']} | {r['max_abs_diff']:.3g} | {r['max_abs_output']:.3g} | {rel:.2g} | "
                     f"{bn['file']} / {bn['after_ort_optimisation']} | {r['int8_max_abs_diff']:.3g} | {rel8:.2g} | "
                     f"{q['dequantize_linear']} | {q['int8_elements']:,} / {q['int8_weights']:,} |")  # fmt: skip
    lines += ["", "## Optional columns", ""]
    for label in OPTIONAL:
        cells = [(r["model"], r["optional"].get(label)) for r in rows]
        if all(c is None for _, c in cells):
            lines.append(f"- `{label}`: not measured, the function is not in this checkout's `sharify.deploy`.")
            continue
        for model, c in cells:
            if c is None or "error" in c:
                lines.append(f"- `{label}` {model}: {'not measured' if c is None else c['error']}")
            else:
                lines.append(f"- `{label}` {model}: ONNX {_mb(c['shared_bytes'])} / {_mb(c['original_bytes'])} MB = "
                             f"{c['ratio']:.4f} of the original; check {c['check']}")  # fmt: skip
    return "\n".join(lines) + "\n"


def _version(name: str) -> str:
    try:
        return str(__import__(name).__version__)
    except (ImportError, AttributeError):
        return "absent"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--aoti", action="store_true", help="also AOTInductor packages (slow)")
    parser.add_argument("--quick", action="store_true", help="smoke run: wrn-16-1, batch 1, 3 rounds, a temp dir")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.repeats, args.warmup = ["wrn-16-1"], [1], 3, 1
    out = args.out or (Path(tempfile.mkdtemp(prefix="sharify-deploy-")) if args.quick else RESULTS)
    command = "python -m benchmarks.deploy " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {
        "command": command.strip(), "machine": machine(),
        "versions": {n: _version(n) for n in ("onnx", "onnxscript", "onnxruntime")},
        "settings": {"threads": args.threads, "batches": args.batches, "repeats": args.repeats, "warmup": args.warmup,
                     "bytes_tolerance": BYTES_TOLERANCE, "latency_target": LATENCY_TARGET},
        "models": [], "latency": [],
    }  # fmt: skip
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="sharify-deploy-") as work:
            row, lat = measure(name, args, Path(work))
        results["models"].append(row)
        results["latency"] += lat
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "deploy.md").write_text(markdown(results))
    print(f"results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
