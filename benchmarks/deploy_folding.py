"""Deployment cost of keeping the sharing: speed of the BN-folded shared model, size of the int8 files.

    python -m benchmarks.deploy_folding                                  # resnet18 + resnet50, eager and compiled
    python -m benchmarks.deploy_folding --models resnet18 --no-compile --repeats 5   # a quick look

Speed: ``sharify.fold_batchnorm(shared)`` (the shared weights kept once, a per-member scale and bias after
each shared conv) against the original folded with torch's usual conv-BN fusion
(``torch.fx.experimental.optimization.fuse``, the reference) and against ``sharify.fold_batchnorm(original)``
(the same fusion done in the module tree, so that the two sharify-folded models differ only by the members'
scale and bias). Inference at batch 8, 128 px, in PyTorch eager and under ``torch.compile``, the models timed
in interleaved rounds (``benchmarks.perf.interleaved``); the figure is the median of each round's time ratio
(folded shared / reference: below 1 is faster) with a distribution-free 95 % interval
(``benchmarks.perf.median_ci``). Targets: eager <= 1.05, compiled <= 1.02.

Size: safetensors files (``safetensors.torch.save`` of the state_dict) of the original and the shared model,
float32 and after ``sharify.quantize_int8`` (each shared tensor quantised once), each also after folding.

Results: ``benchmarks/results/deploy_folding.md`` and ``.json``. :func:`speed` and :func:`sizes` are what
another benchmark calls.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn
from torch.fx.experimental.optimization import fuse

import sharify
from benchmarks.perf import build, cpu_times, interleaved, machine, median_ci, steal_share

RESULTS = Path(__file__).parent / "results"
#: Time ratio (folded shared / original folded by torch) the issue asks for.
TARGETS = {False: 1.05, True: 1.02}  # by compiled


def verdict(ratio: float, ci: tuple[float, float], target: float) -> str:
    """``met`` (median at or below ``target``), ``noise`` (median above, but the interval reaches the target) or
    ``above`` (the whole interval over it)."""
    return "met" if ratio <= target else "noise" if ci[0] <= target else "above"


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that the output check means something (speed does not depend on them)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
    return model


def folded_models(name: str) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The three folded models of ``name`` (checked against the unfolded ones) and a batch-8 input."""
    torch.manual_seed(0)
    original, shape = build(name)
    original = _randomise_norms(original).eval()
    shared = sharify.sharify(original).eval()
    x = torch.randn(*shape)
    models = {
        "torch_fused_original": fuse(copy.deepcopy(original)),
        "sharify_folded_original": sharify.fold_batchnorm(original),
        "sharify_folded_shared": sharify.fold_batchnorm(shared),
    }
    with torch.no_grad():
        reference, expected = original(x), shared(x)
        for label, m in models.items():
            want = expected if label.endswith("shared") else reference
            error = ((m(x) - want).abs().max() / want.abs().max()).item()
            if error > 1e-4:
                raise AssertionError(f"{name} {label}: folded output differs by {error:.2e}")
    return models, x


def _infer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    @torch.no_grad()
    def call() -> None:
        model(x)

    return call


def speed(name: str, *, compiled: bool, warmup: int = 3, repeats: int = 15) -> list[dict[str, Any]]:
    """Inference time of the folded shared model against the two folded originals, one row per reference."""
    models, x = folded_models(name)
    if compiled:
        models = {k: torch.compile(m) for k, m in models.items()}  # type: ignore[misc]
    times = interleaved({k: _infer(m, x) for k, m in models.items()}, torch.device("cpu"), warmup, repeats)
    target = TARGETS[compiled]
    rows = []
    for reference in ("torch_fused_original", "sharify_folded_original"):
        paired = [s / o for s, o in zip(times["sharify_folded_shared"], times[reference], strict=True)]
        ratio, ci = statistics.median(paired), median_ci(paired)
        rows.append({
            "model": name, "batch": list(x.shape), "compile": compiled, "reference": reference,
            "reference_ms": 1e3 * statistics.median(times[reference]),
            "shared_ms": 1e3 * statistics.median(times["sharify_folded_shared"]),
            "ratio": ratio, "ratio_ci95": list(ci), "target": target, "verdict": verdict(ratio, ci, target),
            "warmup": warmup, "repeats": repeats,
        })  # fmt: skip
        r = rows[-1]
        print(f"{name:10s} compile={compiled!s:5s} vs {reference:24s} {r['shared_ms']:7.1f} ms / "
              f"{r['reference_ms']:7.1f} ms = {ratio:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})", flush=True)  # fmt: skip
    return rows


def _file_bytes(model: nn.Module) -> int:
    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sizes(name: str) -> dict[str, Any]:
    """Parameters and safetensors bytes of the original and the shared model: float32 and int8, unfolded and
    folded (sharify's folding; for the original it is torch's)."""
    torch.manual_seed(0)
    original = build(name)[0].eval()
    shared = sharify.sharify(original).eval()
    r = sharify.report(original, shared)
    folded = {"original": sharify.fold_batchnorm(original), "shared": sharify.fold_batchnorm(shared)}
    row: dict[str, Any] = {
        "model": name,
        "params_original": r.params_before,
        "params_shared": r.params_after,
        "params_after_folding_report": r.params_after_folding,
        "params_folded_original": _params(folded["original"]),
        "params_folded_shared": _params(folded["shared"]),
    }
    for label, model in (("original", original), ("shared", shared)):
        row[f"float32_bytes_{label}"] = _file_bytes(model)
        row[f"int8_bytes_{label}"] = _file_bytes(sharify.quantize_int8(model))
        row[f"folded_int8_bytes_{label}"] = _file_bytes(sharify.quantize_int8(folded[label]))
    print(json.dumps(row), flush=True)
    return row


def write(results: dict[str, Any], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_folding.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    load = results["load_average"]
    lines = [
        "# Deployment: the BN-folded shared model's speed, the int8 files' size",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores (torch threads: {m['torch_threads']}), shared with other "
        f"jobs (1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
        + (f"; CPU time stolen by the VM host: {m['steal_share']:.0%}" if m.get("steal_share") else "")
        + f"); Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, sharify {m['sharify']}.",
        "",
        "## Inference time: `fold_batchnorm(shared)` / the folded original (below 1: faster)",
        "",
        "Reference `torch_fused_original`: `torch.fx.experimental.optimization.fuse(original)`, torch's usual "
        "conv-BN fusion (a GraphModule); `sharify_folded_original`: `sharify.fold_batchnorm(original)`, the same "
        "fusion kept in the module tree. Median over interleaved rounds of each round's time ratio, with its "
        "distribution-free 95 % interval; verdict against the target: met, noise (the interval reaches it) or "
        "above.",
        "",
        "| model | batch | compile | reference | reference ms | shared ms | ratio | 95% CI | target | verdict |",
        "|---|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in results["speed"]:
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['batch']))} | {r['compile']} | `{r['reference']}` "
            f"| {r['reference_ms']:.1f} | {r['shared_ms']:.1f} | {r['ratio']:.3f} "
            f"| {r['ratio_ci95'][0]:.3f}-{r['ratio_ci95'][1]:.3f} | <= {r['target']} | {r['verdict']} |"
        )
    crossing = [r for r in results["speed"] if r["ratio_ci95"][1] > r["target"]]
    widest = max((r["ratio_ci95"][1] - r["ratio_ci95"][0] for r in results["speed"]), default=0.0)
    lines += [
        "",
        f"Targets met by the median in {sum(r['verdict'] == 'met' for r in results['speed'])} of "
        f"{len(results['speed'])} rows. Noise: the 95 % intervals are up to {widest:.3f} wide, and in "
        f"{len(crossing)} of {len(results['speed'])} rows the interval reaches above the target, so on this machine "
        "a slowdown of the targets' size (5 % eager, 2 % compiled) can be neither shown nor ruled out there; "
        "what the runs show is no slowdown larger than the machine's noise.",
    ]
    lines += [
        "",
        "## Size: parameters and safetensors files",
        "",
        "`int8`: `sharify.quantize_int8` (weight-only, per-output-channel scales; each shared tensor quantised "
        "once, in its holder); `folded`: `sharify.fold_batchnorm` first. The original is quantised the same way.",
        "",
        "| model | parameters folded: original / shared | float32 file: original / shared "
        "| int8 file: original / shared | folded int8 file: original / shared |",
        "|---|---|---|---|---|",
    ]

    def pair(r: dict[str, Any], key: str, unit: float, fmt: str) -> str:
        a, b = r[f"{key}_original"], r[f"{key}_shared"]
        return f"{a / unit:{fmt}} / {b / unit:{fmt}} ({b / a:.3f})"

    for r in results["sizes"]:
        lines.append(
            f"| {r['model']} | {pair(r, 'params_folded', 1e6, '.2f')} M | {pair(r, 'float32_bytes', 2**20, '.1f')} MiB "
            f"| {pair(r, 'int8_bytes', 2**20, '.1f')} MiB | {pair(r, 'folded_int8_bytes', 2**20, '.1f')} MiB |"
        )
    (out / "deploy_folding.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load = cpu_times(), os.getloadavg()[0]
    results: dict[str, Any] = {"machine": machine(), "speed": [], "sizes": []}
    for name in args.models:
        for compiled in (False,) if args.no_compile else (False, True):
            results["speed"] += speed(name, compiled=compiled, warmup=args.warmup, repeats=args.repeats)
    results["sizes"] = [sizes(name) for name in args.models]
    results["machine"]["steal_share"] = steal_share(start, cpu_times())
    results["load_average"] = {"start": load, "end": os.getloadavg()[0]}
    command = "python -m benchmarks.deploy_folding " + " ".join(argv if argv is not None else sys.argv[1:])
    write(results, args.out, command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
