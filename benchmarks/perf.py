"""Performance of sharified models against their originals, measured side by side in one process.

    python -m benchmarks.perf                       # full run (CPU here: ~30-60 min with compile)
    python -m benchmarks.perf --quick               # resnet50 only, eager, fewer repeats
    python -m benchmarks.perf --device cuda --amp bf16 --channels-last --compile   # on a GPU machine
    python -m benchmarks.perf --quick --delta-only --out benchmarks/results/perf_delta   # relaxed sharing only

Every speed figure is a ratio sharified/original of throughputs measured interleaved (A B, B A, ...):
the median over ``--repeats`` timed rounds (the order alternating) of each round's ratio, after warm-up,
on the same inputs. Memory
figures are exact byte counts (parameters, optimizer state, safetensors checkpoint) and the peak memory
of two training steps of each model built alone from the meta device (CUDA allocator peak on GPU; on CPU
the growth of the peak resident set of a fresh subprocess per model, measured from after its imports --
the high-water mark is reset through ``/proc/self/clear_refs`` -- with malloc mapping large blocks on
their own so the resident set follows the live tensors). The ``sharify()`` wall time covers trace +
fake-tensor shape propagation + rewrite. Relaxed sharing (``delta_rank``, ``param_budget``; target >= 0.97) is
measured in two implementations timed in the same rounds as the original: the library's (``W + B @ A``
materialised once per forward) and a reference applying the delta to the activations as two more convolutions
(:mod:`benchmarks.delta_reference`). Results go to
``benchmarks/results/perf.md`` and ``perf.json`` (or ``--out``) with the machine and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import sharify
from benchmarks.cifar_models import wide_resnet
from benchmarks.delta_reference import ActivationDelta, activation_delta, max_difference

RESULTS = Path(__file__).parent / "results"
#: Throughput target of the issue: sharified / original >= 0.98.
TARGET_RATIO = 0.98
#: Throughput target of relaxed sharing (``delta_rank``, ``param_budget``): sharified / original >= 0.97.
DELTA_TARGET = 0.97


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Model and a CPU-sized input shape (batch, C, H, W)."""
    if name.startswith("wrn-"):  # CIFAR wide ResNet, e.g. wrn-28-10
        depth, k = map(int, name[4:].split("-"))
        return wide_resnet(depth, k), (16, 3, 32, 32)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:]), (8, 3, 128, 128)
    return torchvision.models.get_model(name), (8, 3, 128, 128)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_fn(model: nn.Module, x: torch.Tensor, train: bool, amp: str | None) -> Callable[[], None]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    autocast = (lambda: torch.autocast(x.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    if not train:

        @torch.no_grad()
        def infer() -> None:
            with autocast():
                model(x)

        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()

    return step


def interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each function over ``repeats`` rounds, timed alternately.

    Each round calls every function once; the order is reversed every other round (A B, B A, ...) so that
    neither function always runs right after the other, the way a first-measured model otherwise pays
    for allocator growth and primitive caches that the second one then finds warm.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeats):
        for k in keys if i % 2 == 0 else keys[::-1]:
            _sync(device)
            t = time.perf_counter()
            fns[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics ``k`` and ``n + 1 - k`` with
    ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2`` (the whole range when ``n`` is too small for any ``k``)."""
    xs, n = sorted(values), len(values)
    alpha, k, below = (1 - confidence) / 2, 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2**n <= alpha:
        below += math.comb(n, k) / 2**n
        k += 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k]


def verdict(ratio: float, ci: tuple[float, float], target: float = TARGET_RATIO) -> str:
    """``met`` (median at or above ``target``), ``noise`` (median below, but the interval reaches the target: no
    shortfall this machine can tell apart from its noise) or ``below`` (the whole interval under the target)."""
    return "met" if ratio >= target else "noise" if ci[1] >= target else "below"


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def ratio_stats(base: list[float], other: list[float], target: float = TARGET_RATIO) -> dict[str, Any]:
    """Throughput ratio ``other / base`` from seconds per call timed in the same rounds (:func:`interleaved`).

    The two calls of a round run back to back, so a round's ratio cancels the machine's slow drifts (steal time
    of a shared VM, thermal state); the figure is the median of those paired ratios, its interquartile range
    the noise (one that contains 1 is no difference), with the 95 % interval of the median and the
    :func:`verdict` against ``target``.
    """
    paired = [b / o for b, o in zip(base, other, strict=True)]
    ratio, (q1, q3), ci = statistics.median(paired), _quartiles(paired), median_ci(paired)
    return {
        "ratio": ratio,
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ratio_ci95": list(ci),
        "verdict": verdict(ratio, ci, target),
    }


def _variants(args: argparse.Namespace) -> list[tuple[bool, bool]]:
    """The (channels_last, compiled) combinations a run measures: eager, then as asked."""
    variants = [(False, False)]
    variants += [(True, False)] if args.channels_last else []
    variants += [(args.channels_last, True)] if args.compile else []
    return variants


def _prepare(
    models: dict[str, nn.Module], device: torch.device, channels_last: bool, compiled: bool
) -> dict[str, nn.Module]:
    """Copies of ``models`` on ``device``, in channels-last memory format and compiled as asked."""
    out = {}
    for label, m in models.items():
        m = copy.deepcopy(m).to(device)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        out[label] = torch.compile(m) if compiled else m
    return out


def _timed_modes(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    cached: tuple[str, ...] = (),
) -> list[tuple[bool, dict[str, list[float]]]]:
    """Seconds per call of each model, timed interleaved, for a training step and then an inference batch.

    The models named in ``cached`` are timed for inference only, inside :func:`sharify.cached_weights` (entered
    once around all their calls, as around an evaluation loop).
    """
    out = []
    for train in (True, False):
        timed = {k: m for k, m in models.items() if not (train and k in cached)}
        for m in timed.values():
            m.train(train)
        with contextlib.ExitStack() as stack:
            for k in cached:
                if k in timed:
                    stack.enter_context(sharify.cached_weights(timed[k]))
            fns = {k: _step_fn(m, x, train, args.amp) for k, m in timed.items()}
            out.append((train, interleaved(fns, device, args.warmup, args.repeats)))
    return out


def speed(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Throughput of the sharified ``name`` against the original, per mode and variant."""
    torch.manual_seed(0)
    original, shape = build(name)
    shared = sharify.sharify(original)
    x = torch.randn(*shape, device=device)
    rows = []
    for channels_last, compiled in _variants(args):
        models = _prepare({"original": original, "shared": shared}, device, channels_last, compiled)
        xin = x.to(memory_format=torch.channels_last) if channels_last else x
        for train, times in _timed_modes(models, xin, args, device):
            t = {k: statistics.median(v) for k, v in times.items()}
            stats = ratio_stats(times["original"], times["shared"])
            rows.append({
                "model": name, "mode": "train step" if train else "inference", "batch": list(shape),
                "channels_last": channels_last, "compile": compiled, "amp": args.amp or "fp32",
                "original_img_s": shape[0] / t["original"], "shared_img_s": shape[0] / t["shared"], **stats,
                "original_step_s": t["original"], "repeats": args.repeats, "warmup": args.warmup,
            })  # fmt: skip
            _print_row(rows[-1], "shared")
    return rows


def _print_row(r: dict[str, Any], label: str) -> None:
    q1, q3, ci = r["ratio_q1"], r["ratio_q3"], r["ratio_ci95"]
    print(f"{r['model']:16s} {r['mode']:10s} cl={r['channels_last']!s:5s} compile={r['compile']!s:5s} "
          f"orig {r['original_img_s']:8.1f} img/s  {label} {r['shared_img_s']:8.1f} img/s  "
          f"ratio {r['ratio']:.3f} (IQR {q1:.3f}-{q3:.3f}, 95% CI {ci[0]:.3f}-{ci[1]:.3f})", flush=True)  # fmt: skip


def step_flops(model: nn.Module, x: torch.Tensor, train: bool, cached: bool = False) -> int:
    """FLOPs of one call of :func:`_step_fn` (forward, plus backward for a training step; the optimizer's
    elementwise update is not counted), by ``torch.utils.flop_counter``: exact, and immune to the machine's noise.
    ``cached``: an inference call inside :func:`sharify.cached_weights`, after a first call filled the cache."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).train(train)
    with contextlib.ExitStack() as stack:
        if cached:
            stack.enter_context(sharify.cached_weights(model))
            with torch.no_grad():
                model(x)
        with FlopCounterMode(display=False) as counter:
            if train:
                model(x).float().square().mean().backward()
            else:
                with torch.no_grad():
                    model(x)
    return int(counter.get_total_flops())


def delta_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The relaxed-sharing options measured: ``{"delta_rank": r}`` per rank, then ``{"param_budget": f}``."""
    return [{"delta_rank": r} for r in args.delta_ranks] + [{"param_budget": f} for f in args.delta_budgets]


def delta_speed(
    name: str, spec: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """Throughput of relaxed sharing (``sharify(model, **spec)``) against the original, in two implementations.

    ``materialised`` is the library's member conv (``W + B @ A`` once per forward, one convolution);
    ``activations`` the benchmark's reference (:mod:`benchmarks.delta_reference`: the shared convolution plus a
    ``kh x kw`` conv with ``A`` and a 1x1 conv with ``B`` over the activations). The three models are timed in
    the same rounds; each row's ratio is to the original (target :data:`DELTA_TARGET`), and the activations
    rows also carry ``vs_materialised``, their paired throughput ratio to the materialised implementation
    (> 1: the activations are faster). ``max_rel_difference`` checks that both compute the same function.
    """
    torch.manual_seed(0)
    original, shape = build(name)
    shared = sharify.sharify(original, **spec)
    report = sharify.report(original, shared)
    reference = activation_delta(shared)
    x = torch.randn(*shape)
    base = {
        "model": name, "sharing": ", ".join(f"{k}={v}" for k, v in spec.items()), "options": spec,
        "param_fraction": report.params_after / report.params_before, "batch": list(shape),
        "members_with_delta": sum(isinstance(m, ActivationDelta) for m in reference.modules()),
        "max_rel_difference": max_difference(shared, reference, x), "amp": args.amp or "fp32",
    }  # fmt: skip
    x = x.to(device)
    rows = []
    for channels_last, compiled in _variants(args):
        models = {"original": original, "materialised": shared, "activations": reference}
        models = _prepare(models, device, channels_last, compiled)
        cached = () if compiled else ("cached",)  # a compiled model computes its graph; the cache is eager's
        if cached:
            models["cached"] = copy.deepcopy(models["materialised"])
        xin = x.to(memory_format=torch.channels_last) if channels_last else x
        for train, times in _timed_modes(models, xin, args, device, cached):
            t = {k: statistics.median(v) for k, v in times.items()}
            versus = ratio_stats(times["materialised"], times["activations"], 1.0)
            flops = {k: step_flops(m, x.cpu(), train) for k, m in (("original", original), ("materialised", shared),
                                                                   ("activations", reference))}  # fmt: skip
            if "cached" in times:
                flops["cached"] = step_flops(shared, x.cpu(), train, cached=True)
            for impl in [k for k in ("materialised", "activations", "cached") if k in times]:
                rows.append({
                    **base, "mode": "train step" if train else "inference", "channels_last": channels_last,
                    "compile": compiled, "implementation": impl, "original_img_s": shape[0] / t["original"],
                    "shared_img_s": shape[0] / t[impl], **ratio_stats(times["original"], times[impl], DELTA_TARGET),
                    "original_step_s": t["original"], "repeats": args.repeats, "warmup": args.warmup,
                    "original_flops": flops["original"], "shared_flops": flops[impl],
                })  # fmt: skip
                _print_row(rows[-1], f"{base['sharing']} {impl} (FLOPs x{flops[impl] / flops['original']:.4f})")
                if impl == "activations":
                    rows[-1]["vs_materialised"] = {"ratio": versus["ratio"], "ratio_ci95": versus["ratio_ci95"]}
    return rows


def call_overhead(name: str, calls: int = 20_000) -> dict[str, Any]:
    """What a member conv adds to each call, timed directly: reading ``weight`` and ``bias`` through the holder
    (a property) instead of the conv's own parameters (an attribute lookup), summed over the members of a
    forward. Immune to the run-to-run noise of the throughput ratios, it bounds the Python overhead of sharing."""
    import timeit

    torch.manual_seed(0)
    original, _ = build(name)
    shared = sharify.sharify(original)
    members = [m for m in shared.modules() if sharify.is_shared_conv(m)]
    plain = next(m for m in original.modules() if isinstance(m, nn.Conv2d))

    def read(conv: nn.Module) -> Callable[[], None]:
        def f() -> None:
            conv.weight  # noqa: B018 (the read is what is timed)
            conv.bias  # noqa: B018

        return f

    timing = {label: min(timeit.repeat(read(conv), number=calls, repeat=5)) / calls
              for label, conv in (("member", members[0]), ("plain", plain))}  # fmt: skip
    extra = timing["member"] - timing["plain"]  # negative: the property is faster than Module.__getattr__
    return {"model": name, "members": len(members), "member_read_s": timing["member"],
            "plain_read_s": timing["plain"], "extra_per_forward_s": extra * len(members)}  # fmt: skip


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory(name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    original, _ = build(name)
    shared = sharify.sharify(original)
    report = sharify.report(original, shared)
    out: dict[str, Any] = {"model": name, "param_fraction": report.params_after / report.params_before}
    for label, m in (("original", original), ("shared", shared)):
        out[f"{label}_param_bytes"] = _nbytes(m.parameters())
        for opt_name, opt_cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
            m.zero_grad(set_to_none=True)
            kw = {"momentum": 0.9} if opt_name == "sgd" else {}
            opt = opt_cls(m.parameters(), lr=1e-3, **kw)
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            out[f"{label}_{opt_name}_state_bytes"] = _nbytes(
                v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0
            )
            m.zero_grad(set_to_none=True)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.safetensors")
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
            out[f"{label}_checkpoint_bytes"] = os.path.getsize(path)
    for key in ("param_bytes", "sgd_state_bytes", "adamw_state_bytes", "checkpoint_bytes"):
        out[f"{key}_ratio"] = out[f"shared_{key}"] / out[f"original_{key}"]
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Start a peak-memory measurement; returns the baseline (KiB) for :func:`peak_rss_growth`.

    On Linux the resident-set high-water mark is reset (``clear_refs`` 5), so the growth is measured from
    now even when the imports peaked higher than the work that follows (a small model). Elsewhere the
    process's peak so far is the baseline, which under-reports work that stays below it."""
    import resource

    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_growth(baseline_kib: int) -> int:
    """Bytes by which the peak resident set grew past ``baseline_kib`` since :func:`reset_peak_rss`."""
    import resource

    try:
        peak = _status_kib("VmHWM")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak - baseline_kib, 0) * 1024


_PEAK_SCRIPT = """
import sys, torch, sharify
from benchmarks.perf import build, training_peak, reset_peak_rss, peak_rss_growth
baseline = reset_peak_rss()
print(training_peak(sys.argv[1], sys.argv[2] == "shared", torch.device("cpu")), peak_rss_growth(baseline))
"""

# glibc's malloc serves large blocks from its heap once the dynamic mmap threshold has grown, and the
# resident set then lags behind what is allocated; a fixed threshold maps every tensor of 128 KiB or more
# on its own, so the peak resident set tracks the peak of live tensors (the same figure run after run).
_PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def training_peak(name: str, shared: bool, device: torch.device) -> int:
    """Builds the model (sharified if ``shared``) on the meta device, materialises it on ``device`` and runs two
    SGD steps (momentum, gradients kept between steps: ``zero_grad(set_to_none=False)``, so parameters,
    gradients and momentum are all resident at the peak); returns the parameter bytes.

    The process never holds the original's per-member weights, so its peak is the shared model's own.
    """
    torch.manual_seed(0)
    with torch.device("meta"):
        model, shape = build(name)
        if shared:
            model = sharify.sharify(model, inplace=True)
    model = model.to_empty(device=device).train()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.reset_running_stats()
    x = torch.randn(*shape, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        model(x).float().square().mean().backward()
        opt.step()
    return _nbytes(model.parameters())


def peak_step_memory(name: str, device: torch.device) -> dict[str, Any]:
    """Peak memory of two training steps of the original and of the sharified model, each built alone.

    On CUDA the allocator's peak; on CPU the growth of the peak resident set of a fresh process (after its
    imports), with malloc set to map large blocks on their own (``_PEAK_ENV``). ``predicted_saving_bytes`` is
    what sharing must save at least: three copies (weights, gradients, momentum) of the saved parameters.
    """
    out: dict[str, Any] = {}
    for label in ("original", "shared"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            param_bytes = training_peak(name, label == "shared", device)
            torch.cuda.synchronize()
            out[f"{label}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        else:
            cmd = [sys.executable, "-c", _PEAK_SCRIPT, name, label]
            env = {**os.environ, **_PEAK_ENV}
            stdout = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            param_bytes, peak = map(int, stdout.split()[-2:])
            out[f"{label}_peak_bytes"] = peak
        out[f"{label}_param_bytes"] = param_bytes
    out["predicted_saving_bytes"] = 3 * (out["original_param_bytes"] - out["shared_param_bytes"])
    out["saving_bytes"] = out["original_peak_bytes"] - out["shared_peak_bytes"]
    return out


def sharify_time(name: str, meta: bool = False, repeats: int = 3) -> dict[str, Any]:
    """Median wall time of ``sharify.sharify``; ``meta=True`` builds the (timm) model on the meta device."""
    import timm

    times, params = [], 0
    for _ in range(repeats):
        if meta:
            with torch.device("meta"):
                model = timm.create_model(name)
        else:
            model = build(name)[0]
        params = sum(p.numel() for p in model.parameters())
        t = time.perf_counter()
        sharify.sharify(model)
        times.append(time.perf_counter() - t)
    return {"model": name, "meta_device": meta, "params": params, "seconds": statistics.median(times)}


_ANALYSIS_MEMORY_SCRIPT = """
import sys, timm, torch, sharify, sharify.analysis.tracing
from benchmarks.perf import reset_peak_rss, peak_rss_growth
with torch.device("meta"):
    model = timm.create_model(sys.argv[1])
baseline = reset_peak_rss()
sharify.sharify(model)
growth = peak_rss_growth(baseline)
nodes = len(sharify.analysis.tracing.trace(model).graph.nodes)
print(sum(p.numel() for p in model.parameters()), nodes, growth)
"""


def analysis_memory(name: str) -> dict[str, Any]:
    """Growth of the peak resident set while ``sharify()`` analyses and rewrites a meta-device timm model,
    in a fresh process (so earlier work does not hide it)."""
    cmd = [sys.executable, "-c", _ANALYSIS_MEMORY_SCRIPT, name]
    params, nodes, growth = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-3:]
    return {"model": name, "params": int(params), "graph_nodes": int(nodes), "peak_rss_growth_bytes": int(growth)}


def machine() -> dict[str, Any]:
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "sharify": sharify.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_times() -> dict[str, int] | None:
    """Cumulative CPU time counters of the machine (``/proc/stat``, Linux only), for the steal share."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return dict(zip(names, map(int, fields)))


def steal_share(start: dict[str, int] | None, end: dict[str, int] | None) -> float | None:
    """Share of the CPU time a virtual machine's host took away (steal) between two :func:`cpu_times`."""
    if not start or not end:
        return None
    total = sum(end.values()) - sum(start.values())
    return (end["steal"] - start["steal"]) / total if total > 0 else None


def _header_lines(m: dict[str, Any], command: str) -> list[str]:
    """The markdown's title, command and machine."""
    return [
        "# Performance: sharified vs original, measured side by side",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m.get('gpu', m['cpu'])}, {m['cpu_count']} CPU cores ({m['torch_threads']} torch threads); "
        f"Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, sharify {m['sharify']}."
        + (f" CPU time stolen by the VM host during the run: {m['steal_share']:.0%}." if m.get("steal_share") else ""),
    ]


def _speed_lines(results: dict[str, Any]) -> list[str]:
    """The throughput table of the plain sharified models, its target line and the call overhead."""
    lines = [
        "",
        "## Throughput (images/s; ratio = shared / original, target >= 0.98)",
        "",
        "Throughputs are medians over the timed rounds; the ratio is the median of the per-round ratios (the two "
        "models of a round run back to back, so slow drifts of the machine cancel), its IQR their interquartile "
        "range "
        "(the order of the two models alternates every round), i.e. the run-to-run noise of this machine.",
        "",
        "| model | mode | batch | channels_last | compile | precision | original | shared | ratio | ratio IQR "
        "| 95% CI of the ratio | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["speed"]:
        ci = r.get("ratio_ci95", [r["ratio"], r["ratio"]])
        lines.append(
            f"| {r['model']} | {r['mode']} | {'x'.join(map(str, r['batch']))} | {r['channels_last']} | {r['compile']} "
            f"| {r['amp']} | {r['original_img_s']:.1f} | {r['shared_img_s']:.1f} | {r['ratio']:.3f} "
            f"| {r.get('ratio_q1', r['ratio']):.3f}-{r.get('ratio_q3', r['ratio']):.3f} | {ci[0]:.3f}-{ci[1]:.3f} "
            f"| {r.get('verdict', '-')} |"
        )
    verdicts = [r.get("verdict") for r in results["speed"]]
    lines += ["", f"Target (ratio >= {TARGET_RATIO}): {verdicts.count('met')} of {len(verdicts)} rows met; "
              f"{verdicts.count('noise')} below it by less than this machine's noise (the 95% confidence interval of "
              f"the median reaches {TARGET_RATIO}); {verdicts.count('below')} measurably below."]  # fmt: skip
    if results.get("overhead"):
        lines += ["", "### What sharing adds to a call, timed directly", "",
                  "A member conv reads `weight` and `bias` through the holder (a property) instead of its own "
                  "parameters; everything else it computes is the original conv's. Timed over many calls (best of 5), "
                  "the difference per forward (negative: faster), against the original's median inference step of the "
                  "same run:", "",
                  "| model | member convs | read per member | read per plain conv | extra per forward "
                  "| share of an inference step |", "|---|---|---|---|---|---|"]  # fmt: skip
        steps = {r["model"]: r["original_step_s"] for r in results["speed"]
                 if r["mode"] == "inference" and not r["channels_last"] and not r["compile"]}  # fmt: skip
        for r in results["overhead"]:
            step = steps.get(r["model"])
            share = f"{r['extra_per_forward_s'] / step:+.4%}" if step else "-"
            lines.append(
                f"| {r['model']} | {r['members']} | {r['member_read_s'] * 1e9:.0f} ns "
                f"| {r['plain_read_s'] * 1e9:.0f} ns | {r['extra_per_forward_s'] * 1e6:+.1f} us | {share} |"
            )
    return lines


def _delta_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The relaxed-sharing table (:func:`delta_speed`) and its target line."""
    lines = ["", f"## Relaxed sharing (delta_rank, param_budget): ratio = shared / original, target >= {DELTA_TARGET}",
             "", "Each member conv owns a low-rank delta `B @ A` added to the shared weight. Two implementations, "
             "timed in the same rounds as the original (the order of the models alternating every round): "
             "*materialised*, the library's member conv (`W + (B @ A).view_as(W)` once per forward, one "
             "convolution), and *activations*, a reference built only in the benchmark "
             "(`benchmarks/delta_reference.py`: the shared convolution plus a kh x kw conv with `A` (r output "
             "channels) and a 1x1 conv with `B` over the activations). *act / mat* is the paired throughput ratio "
             "of the two (> 1: the activations are faster), with its 95% CI. Both compute the same function: "
             "*max diff* is their largest output difference relative to the largest output (eval mode). *FLOPs* "
             "is the step's FLOP count relative to the original's (`torch.utils.flop_counter`, forward + backward "
             "for a training step): exact, so it shows what the implementation costs where the timings' noise "
             "hides it. *cached* (inference only, eager only) is the library's member conv inside "
             "`sharify.cached_weights(model)`, entered once around all its calls as around an evaluation loop: "
             "each member's sum is computed once, not per forward.", "",
             "| model | sharing | params | mode | batch | channels_last | compile | precision | implementation "
             "| original | shared | ratio | ratio IQR | 95% CI of the ratio | target | act / mat | FLOPs | max diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ci, vs = r["ratio_ci95"], r.get("vs_materialised")
        versus = f"{vs['ratio']:.3f} ({vs['ratio_ci95'][0]:.3f}-{vs['ratio_ci95'][1]:.3f})" if vs else "-"
        lines.append(
            f"| {r['model']} | {r['sharing']} | {r['param_fraction']:.3f} | {r['mode']} "
            f"| {'x'.join(map(str, r['batch']))} | {r['channels_last']} | {r['compile']} | {r['amp']} "
            f"| {r['implementation']} | {r['original_img_s']:.1f} | {r['shared_img_s']:.1f} | {r['ratio']:.3f} "
            f"| {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | {ci[0]:.3f}-{ci[1]:.3f} | {r['verdict']} | {versus} "
            f"| {r['shared_flops'] / r['original_flops']:.4f} | {r['max_rel_difference']:.1e} |"
        )
    for impl in ("materialised", "activations", "cached"):
        verdicts = [r["verdict"] for r in rows if r["implementation"] == impl]
        if not verdicts:
            continue
        lines += ["", f"Relaxed-sharing target, {impl} (ratio >= {DELTA_TARGET}): {verdicts.count('met')} of "
                  f"{len(verdicts)} rows met; {verdicts.count('noise')} below it by less than this machine's noise; "
                  f"{verdicts.count('below')} measurably below."]  # fmt: skip
    return lines


def _memory_lines(results: dict[str, Any]) -> list[str]:
    """The exact byte counts and the peak memory of a training step."""
    lines: list[str] = []
    lines += ["", "## Memory (ratio = shared / original, target = parameter fraction ± 1 %)", "",
              "Exact byte counts of the parameters, the optimizer state and the safetensors checkpoint.", "",
              "| model | parameter fraction | params | SGD momentum | AdamW state | safetensors file |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["memory"]:
        lines.append(
            f"| {r['model']} | {r['param_fraction']:.4f} | {r['param_bytes_ratio']:.4f} "
            f"| {r['sgd_state_bytes_ratio']:.4f} | {r['adamw_state_bytes_ratio']:.4f} "
            f"| {r['checkpoint_bytes_ratio']:.4f} |"
        )
    peaks = [(r["model"], r["peak"]) for r in results["memory"] if r.get("peak")]
    if peaks:
        where = "the CUDA allocator's peak" if "gpu" in results["machine"] else (
            "growth of the peak resident set of a fresh process per model, malloc mapping every block >= 128 KiB "
            "on its own so that the resident set follows the live tensors"
        )  # fmt: skip
        lines += ["", "### Peak memory of a training step", "",
                  f"Two SGD steps (momentum, gradients kept between steps) of a model built on the meta device and "
                  f"materialised alone ({where}). Activations are the same in both models, so the peak cannot shrink "
                  "by the parameter fraction; what sharing must save is the saved parameters' weights, gradients and "
                  "momentum (3 x the saved parameter bytes, 'predicted'). The shared gradient is summed over the "
                  "members in one buffer that lives from the stage's last member's backward to its first one's, "
                  "which takes back up to one shared weight per stage at the peak.", "",
                  "| model | original | shared | ratio | saved | predicted saving | saved / predicted |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, pk in peaks:
            lines.append(
                f"| {name} | {pk['original_peak_bytes'] / 2**20:.1f} MiB | {pk['shared_peak_bytes'] / 2**20:.1f} MiB "
                f"| {pk['shared_peak_bytes'] / pk['original_peak_bytes']:.3f} | {pk['saving_bytes'] / 2**20:.1f} MiB "
                f"| {pk['predicted_saving_bytes'] / 2**20:.1f} MiB "
                f"| {pk['saving_bytes'] / pk['predicted_saving_bytes']:.2f} |"
            )
    return lines


def _time_lines(results: dict[str, Any]) -> list[str]:
    """The wall time of ``sharify()`` and the memory of its analysis."""
    lines: list[str] = []
    lines += ["", "## sharify() wall time (trace + fake-tensor shapes + rewrite)", "",
              "| model | device | parameters | seconds | target |", "|---|---|---|---|---|"]  # fmt: skip
    targets = {"resnet50": "< 1 s", "resnet152": "< 3 s"}
    for r in results["sharify_time"]:
        lines.append(f"| {r['model']} | {'meta' if r['meta_device'] else 'cpu'} | {r['params'] / 1e6:.1f} M "
                     f"| {r['seconds']:.2f} | {targets.get(r['model'], '-')} |")  # fmt: skip
    if results.get("analysis_memory"):
        lines += ["", "## Analysis memory (meta-device timm models, fresh process each)", "",
                  "Growth of the process's peak resident set during `sharify.sharify(model)`: shapes are propagated "
                  "with fake tensors and the model lives on the meta device, so it does not grow with the parameters, "
                  "only with the traced graph (nodes: one per module call or tensor operation).", "",
                  "| model | parameters | fx graph nodes | peak RSS growth |", "|---|---|---|---|"]  # fmt: skip
        for r in results["analysis_memory"]:
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r.get('graph_nodes', '-')} "
                         f"| {r['peak_rss_growth_bytes'] / 2**20:.1f} MiB |")  # fmt: skip
    return lines


def write(results: dict[str, Any], out: Path, command: str) -> None:
    """Writes ``perf.json`` and ``perf.md`` to ``out`` (suffixed with the GPU's name on a GPU machine); sections
    without rows (a ``--delta-only`` run) are left out of the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_" + results["machine"]["gpu"].replace(" ", "_") if "gpu" in results["machine"] else ""
    (out / f"perf{suffix}.json").write_text(json.dumps(results, indent=2))
    lines = _header_lines(results["machine"], command)
    lines += _speed_lines(results) if results["speed"] else []
    lines += _delta_lines(results["delta"]) if results.get("delta") else []
    lines += _memory_lines(results) if results["memory"] else []
    lines += _time_lines(results) if results["sharify_time"] or results.get("analysis_memory") else []
    (out / f"perf{suffix}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet152", "timm:resnet50d", "wrn-28-10"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 21; 3 with --quick)")
    parser.add_argument("--time-models", nargs="+", default=["resnet50", "resnet152"], help="sharify() wall time")
    parser.add_argument("--big-model", default="resnetv2_152x4_bit", help="timm model analysed on the meta device")
    parser.add_argument("--small-meta-model", default="resnet50", help="timm model compared with --big-model for "
                        "analysis memory")  # fmt: skip
    parser.add_argument("--delta-models", nargs="+", default=None, help="models of the relaxed-sharing rows "
                        "(default resnet50 resnet18; resnet50 with --quick)")  # fmt: skip
    parser.add_argument("--delta-ranks", nargs="*", type=int, default=[8, 32], help="delta_rank values measured")
    parser.add_argument("--delta-budgets", nargs="*", type=float, default=[0.9], help="param_budget values measured")
    parser.add_argument("--delta-only", action="store_true", help="only the relaxed-sharing rows")
    parser.add_argument("--quick", action="store_true", help="resnet50 only, eager, 3 repeats unless --repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.compile = ["resnet50"], False
        args.delta_models = args.delta_models or ["resnet50"]
    args.repeats = args.repeats or (3 if args.quick else 21)
    args.delta_models = args.delta_models or ["resnet50", "resnet18"]
    if args.delta_only:
        args.models, args.time_models, args.big_model = [], [], None
    device = torch.device(args.device)
    start = cpu_times()
    results: dict[str, Any] = {"machine": machine(), "speed": [], "delta": [], "overhead": [], "memory": [],
                               "sharify_time": [], "analysis_memory": []}  # fmt: skip
    for name in args.models:
        results["speed"] += speed(name, args, device)
    for name in args.delta_models:
        for spec in delta_specs(args):
            results["delta"] += delta_speed(name, spec, args, device)
    results["overhead"] = [call_overhead(name) for name in args.models]
    for name in args.models:
        mem = memory(name)
        mem["peak"] = peak_step_memory(name, device)
        results["memory"].append(mem)
        print(json.dumps(mem), flush=True)
    for name in args.time_models:
        results["sharify_time"].append(sharify_time(name))
    if args.big_model:
        results["sharify_time"].append(sharify_time(args.big_model, meta=True, repeats=1))
        results["analysis_memory"] = [analysis_memory(n) for n in (args.small_meta_model, args.big_model)]
    if results["sharify_time"]:
        print(json.dumps(results["sharify_time"], indent=1))
    results["machine"]["steal_share"] = steal_share(start, cpu_times())
    write(results, args.out, "python -m benchmarks.perf " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
