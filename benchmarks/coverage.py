"""Coverage sweep: sharify over every torchvision and timm classification model.

For each model (random init, no download; built on the meta device) the sweep runs :func:`sharify.plan`
and :func:`sharify.sharify` and records whether it traced, the residual blocks and stages found, the
groups, the parameters before/after and the outcome (``shared`` / ``nothing-to-share`` with the library's
reason / ``error``); shared models up to 60 M parameters also get a real forward/backward check (see
:mod:`benchmarks.coverage_check`). Every model runs in a worker process, so a crash or a timeout costs
only that model. Results go to ``<out>/coverage.{csv,json,md}``.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.coverage --jobs 2                   # the full sweep
    python -m benchmarks.coverage --filter 'resnet*' --limit 20 --out /tmp/cov  # a quick look
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.coverage_check import ModelResult, family_of, variant_of
from benchmarks.coverage_summary import write_summary

__all__ = ["list_models", "main", "run_sweep"]


def list_models(patterns: str = "*", limit: int | None = None) -> list[tuple[str, str]]:
    """``(library, name)`` of every torchvision classification builder and every timm model matching one
    of the comma-separated globs ``patterns`` (against ``name``, ``tv:name`` or ``timm:name``), torchvision
    first."""
    import timm
    import torchvision

    models = [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    models += [("timm", n) for n in timm.list_models()]
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    prefix = {"torchvision": "tv", "timm": "timm"}
    picked = [
        (lib, n) for lib, n in models if any(fnmatch.fnmatch(x, g) for g in globs for x in (n, f"{prefix[lib]}:{n}"))
    ]
    return picked[:limit] if limit is not None else picked


def _worker(conn: Connection, options: dict[str, Any]) -> None:
    """Worker process: checks the models it is sent, one at a time, until it gets ``None``."""
    import logging

    import torch

    from benchmarks.coverage_check import check_model

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(check_model(*task, **options).to_dict())


@dataclass
class _Slot:
    process: mp.process.BaseProcess
    conn: Connection
    task: int | None = None  # index of the model being checked
    started: float = 0.0
    done: int = 0


def _failed(task: tuple[str, str], kind: str, reason: str, seconds: float) -> dict[str, Any]:
    library, name = task
    result = ModelResult(library, name, family_of(library, name), variant_of(name))
    result.outcome, result.reason_kind, result.reason, result.seconds = "error", kind, reason, round(seconds, 2)
    return result.to_dict()


def run_sweep(
    models: list[tuple[str, str]],
    *,
    jobs: int = 1,
    timeout: float = 600.0,
    max_tasks_per_worker: int = 25,
    progress: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Checks ``models`` in ``jobs`` worker processes, ``options`` going to :func:`check_model`.

    A model over ``timeout`` seconds or one whose worker dies is recorded as an ``error`` and its worker
    replaced. Returns one result dict per model, in order.
    """
    ctx = mp.get_context("spawn")
    pending = list(reversed(range(len(models))))
    results: dict[int, dict[str, Any]] = {}
    slots: list[_Slot | None] = [None] * min(jobs, len(models))

    def start() -> _Slot:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker, args=(child, options), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def stop(slot: _Slot, kill: bool) -> None:
        if kill:
            slot.process.kill()
        else:
            slot.conn.send(None)
        slot.process.join(30)
        slot.conn.close()

    def finish(i: int, slot: _Slot, outcome: dict[str, Any]) -> None:
        assert slot.task is not None
        results[slot.task] = outcome
        slot.task = None
        bar.update()
        bar.set_postfix_str(f"{outcome['name']}: {outcome['outcome']}", refresh=False)
        if outcome["outcome"] == "error":
            tqdm.write(f"error: {outcome['library']}:{outcome['name']}: {outcome['reason'][:300]}")

    bar = tqdm(total=len(models), disable=not progress, unit="model", dynamic_ncols=True)
    try:
        while len(results) < len(models):
            for i, slot in enumerate(slots):
                if (slot is None or slot.task is None) and pending:
                    if slot is not None and slot.done >= max_tasks_per_worker:  # bound a worker's memory growth
                        stop(slot, kill=False)
                        slot = None
                    slot = slots[i] = slot or start()
                    slot.task, slot.started = pending.pop(), time.monotonic()
                    slot.conn.send(models[slot.task])
            busy = [s for s in slots if s is not None and s.task is not None]
            ready = wait([s.conn for s in busy], timeout=1.0)
            now = time.monotonic()
            for i, slot in enumerate(slots):
                if slot is None or slot.task is None:
                    continue
                model = models[slot.task]
                if slot.conn in ready:
                    try:
                        outcome = slot.conn.recv()
                        slot.done += 1
                        finish(i, slot, outcome)
                        continue
                    except (EOFError, OSError):
                        slot.process.join(5)
                        reason = f"worker died (exit code {slot.process.exitcode})"
                        finish(i, slot, _failed(model, "WorkerCrashed", reason, now - slot.started))
                elif now - slot.started > timeout:
                    reason = f"no result within {timeout:g} s"
                    finish(i, slot, _failed(model, "Timeout", reason, now - slot.started))
                else:
                    continue
                stop(slot, kill=True)  # a worker that crashed or timed out is replaced when next needed
                slots[i] = None
    finally:
        bar.close()
        for slot in slots:
            if slot is not None and slot.process.is_alive():
                stop(slot, kill=slot.task is not None)
    return [results[k] for k in range(len(models))]


def write_results(results: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    """Writes ``coverage.csv``, ``coverage.json`` and the ``coverage.md`` summary to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "coverage.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ModelResult.columns())
        writer.writeheader()
        writer.writerows(results)
    (out / "coverage.json").write_text(json.dumps({"meta": meta, "models": results}, indent=1) + "\n")
    write_summary(results, meta, out / "coverage.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--filter", default="*", help="comma-separated globs over model names ('resnet*,dpn*', 'tv:*', 'timm:*')"
    )
    parser.add_argument("--limit", type=int, default=None, help="check at most this many models")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model (default 600)")
    parser.add_argument("--forward-max-params", type=float, default=60e6, help="real check up to this size")
    parser.add_argument("--input-px", type=int, default=128, help="input side of the real check (default 128)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    import timm
    import torch
    import torchvision

    models = list_models(args.filter, args.limit)
    if not models:
        parser.error(f"no model matches {args.filter!r}")
    start = time.perf_counter()
    results = run_sweep(
        models,
        jobs=args.jobs,
        timeout=args.timeout,
        progress=not args.no_progress,
        forward_max_params=int(args.forward_max_params),
        input_px=args.input_px,
    )
    wall = time.perf_counter() - start
    meta = {
        "command": "OMP_NUM_THREADS={} python -m benchmarks.coverage {}".format(
            os.environ.get("OMP_NUM_THREADS", "unset"), shlex.join(sys.argv[1:] if argv is None else argv)
        ),
        "wall_seconds": round(wall, 1),
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "forward_max_params": int(args.forward_max_params),
        "input_px": args.input_px,
    }
    write_results(results, args.out, meta)
    errors = sum(r["outcome"] == "error" for r in results)
    print(f"{len(results)} models in {wall:.0f} s: "
          f"{sum(r['outcome'] == 'shared' for r in results)} shared, "
          f"{sum(r['outcome'] == 'nothing-to-share' for r in results)} nothing-to-share, {errors} errors; "
          f"results in {args.out}")  # fmt: skip
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
