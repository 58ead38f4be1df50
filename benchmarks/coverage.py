"""Coverage sweep: sharify over the torchvision, timm and transformers model zoos.

The sources (:mod:`benchmarks.coverage_sources`) are every torchvision classification builder and every timm
model, torchvision's detection, segmentation, video and optical-flow builders, and the ``transformers``
image-classification model types with default configs (when ``transformers`` is installed). For each model
(random init, no download; built on the meta device) the sweep runs :func:`sharify.plan` and
:func:`sharify.sharify` with no extra arguments, as a user would, and records whether it traced, the residual
blocks and stages found, the groups, the parameters before/after and the outcome (``shared`` /
``nothing-to-share`` with the library's reason / ``skipped``: a package is missing / ``error``); shared
models up to 60 M parameters also get a real forward/backward check (see :mod:`benchmarks.coverage_check`).
A second pass plans every model with ``preset="minivit"`` (MiniViT's sharing of the Linear layers of
transformer and MLP blocks) and records the same outcome, checked the same way, in the ``minivit_*`` columns.
Every model runs in a worker process, so a crash or a timeout costs only that model. Results go to
``<out>/coverage.{csv,json,md}``; with ``--merge`` the rows of this run replace those of the same models in
the results already in ``<out>`` (all rows of a source run whole), and the summary is recomputed from the
merged rows.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.coverage --jobs 2                   # the full sweep
    python -m benchmarks.coverage --filter 'resnet*' --limit 20 --out /tmp/cov  # a quick look
    OMP_NUM_THREADS=1 python -m benchmarks.coverage --jobs 2 --merge \
        --sources torchvision-detection,torchvision-segmentation,torchvision-video,torchvision-optical-flow,transformers
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

from benchmarks.coverage_check import ModelResult, new_result
from benchmarks.coverage_sources import PREFIXES, SOURCES, source_models
from benchmarks.coverage_summary import errors_of, write_summary

__all__ = ["list_models", "main", "merge_results", "parse_sources", "run_sweep"]


def parse_sources(text: str) -> list[str]:
    """The sources named in the comma-separated ``text`` (``"all"``: every source), in sweep order.

    Raises:
        ValueError: An unknown source name.
    """
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise ValueError(
            f"unknown source(s) {', '.join(map(repr, unknown)) or text!r}; choose from all, {', '.join(SOURCES)}"
        )
    return [s for s in SOURCES if s in names]


def list_models(
    patterns: str = "*", limit: int | None = None, sources: list[str] | tuple[str, ...] = SOURCES
) -> list[tuple[str, str]]:
    """``(source, name)`` of every model of ``sources`` matching one of the comma-separated globs ``patterns``
    (against ``name``, ``<source>:name`` or ``<prefix>:name``, prefixes ``tv``, ``timm``, ``tv-detection``,
    ``hf``, ...), in the order of :data:`~benchmarks.coverage_sources.SOURCES`."""
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    picked = [
        (source, n)
        for source in SOURCES
        if source in sources
        for n in source_models(source)
        if any(fnmatch.fnmatch(x, g) for g in globs for x in (n, f"{PREFIXES[source]}:{n}", f"{source}:{n}"))
    ]
    return picked[:limit] if limit is not None else picked


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row.get("source") or row["library"], row["name"]


def merge_results(
    old: list[dict[str, Any]], new: list[dict[str, Any]], replaced_sources: list[str] | tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """``old`` rows with those of ``new``'s models replaced (and all rows of ``replaced_sources``, sources run
    whole, dropped first), in source order. Rows written before sources existed get ``source = library``."""
    rows = [
        dict({"source": r["library"]}, **r) for r in old if (r.get("source") or r["library"]) not in replaced_sources
    ]
    fresh = {_key(r): r for r in new}
    merged = [fresh.pop(_key(r), r) for r in rows] + list(fresh.values())
    columns = ModelResult.columns()
    order = {s: i for i, s in enumerate(SOURCES)}
    merged = [{c: r.get(c, getattr(ModelResult, c, "")) for c in columns} for r in merged]
    return sorted(merged, key=lambda r: order.get(r["source"], len(order)))  # stable: keeps each source's order


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
    result = new_result(*task)
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
            tqdm.write(f"error: {outcome['source']}:{outcome['name']}: {outcome['reason'][:300]}")
        if outcome["minivit_outcome"] == "error":
            name, reason = f"{outcome['source']}:{outcome['name']}", outcome["minivit_reason"][:300]
            tqdm.write(f"error (MiniViT pass): {name}: {reason}")

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


def _run_meta(args: argparse.Namespace, argv: list[str] | None, sources: list[str], wall: float) -> dict[str, Any]:
    import timm
    import torch
    import torchvision

    try:
        import transformers

        hf_version: str | None = transformers.__version__
    except ImportError:
        hf_version = None
    return {
        "command": "OMP_NUM_THREADS={} python -m benchmarks.coverage {}".format(
            os.environ.get("OMP_NUM_THREADS", "unset"), shlex.join(sys.argv[1:] if argv is None else argv)
        ),
        "sources": sources,
        "wall_seconds": round(wall, 1),
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "transformers": hf_version,
        "date": time.strftime("%Y-%m-%d"),
        "forward_max_params": int(args.forward_max_params),
        "input_px": args.input_px,
    }


def _merge_into(
    out: Path, results: list[dict[str, Any]], meta: dict[str, Any], whole: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows and meta of ``out/coverage.json`` with this run's merged in (see :func:`merge_results`): the
    earlier run's meta stays the base and this run is added to ``meta["merged_runs"]``; the sources it ran whole
    are taken out of the earlier merged runs (it becomes the base when it ran all of the base run's sources)."""
    path = out / "coverage.json"
    if not path.is_file():
        raise FileNotFoundError(f"--merge needs earlier results to merge into, and {path} does not exist; "
                                "run without --merge first")  # fmt: skip
    old = json.loads(path.read_text())
    base = {k: v for k, v in old["meta"].items() if k != "merged_runs"}
    runs = []
    for run in old["meta"].get("merged_runs", []):
        kept = [s for s in run["sources"] if s not in whole]
        models = {s: n for s, n in run["models"].items() if s in kept}
        runs += [{**run, "sources": kept, "models": models}] if kept else []
    rows = merge_results(old["models"], results, whole)
    if set(base.get("sources", ("torchvision", "timm"))) <= set(whole):  # this run replaces the base run
        return rows, {**meta, "merged_runs": runs}
    return rows, {**base, "merged_runs": [*runs, meta]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--filter", default="*", help="comma-separated globs over model names ('resnet*,dpn*', 'tv:*', 'hf:*')"
    )
    parser.add_argument(
        "--sources", default="all", help=f"comma-separated sources to run (default all): {', '.join(SOURCES)}"
    )
    parser.add_argument(
        "--merge", action="store_true", help="merge this run's rows into the results in --out (summary recomputed)"
    )
    parser.add_argument("--limit", type=int, default=None, help="check at most this many models")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model (default 600)")
    parser.add_argument("--forward-max-params", type=float, default=60e6, help="real check up to this size")
    parser.add_argument("--input-px", type=int, default=128, help="input side of the real check (default 128)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        sources = parse_sources(args.sources)
    except ValueError as exc:
        parser.error(str(exc))
    if args.merge and not (args.out / "coverage.json").is_file():
        parser.error(f"--merge: no earlier results in {args.out / 'coverage.json'} to merge into; run without --merge")

    models = list_models(args.filter, args.limit, sources)
    if not models:
        parser.error(f"no model of {', '.join(sources)} matches {args.filter!r}")
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
    meta = _run_meta(args, argv, sources, wall)
    meta["models"] = {s: n for s in sources if (n := sum(r["source"] == s for r in results))}
    rows = results
    if args.merge:
        whole = sources if args.filter == "*" and args.limit is None else []
        rows, meta = _merge_into(args.out, results, meta, whole)
    write_results(rows, args.out, meta)
    errors = len(errors_of(results))  # an error in either pass
    print(f"{len(results)} models in {wall:.0f} s: "
          f"{sum(r['outcome'] == 'shared' for r in results)} shared, "
          f"{sum(r['outcome'] == 'nothing-to-share' for r in results)} nothing-to-share, "
          f"{sum(r['outcome'] == 'skipped' for r in results)} skipped, "
          f"{sum(r['minivit_outcome'] == 'shared' for r in results)} shared with preset='minivit', {errors} errors; "
          f"results in {args.out}" + (f" (merged: {len(rows)} rows)" if args.merge else ""))  # fmt: skip
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
