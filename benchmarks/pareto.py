"""Accuracy per parameter: sharify's compression dial against Torch-Pruning and smaller nets from scratch.

    python -m benchmarks.pareto                  # the full front (see --help for the budget's defaults)
    python -m benchmarks.pareto --smoke          # every step on a tiny subset, in a few minutes
    python -m benchmarks.pareto --from-json A/pareto.json B/pareto.json --out DIR   # table and plot only

For each depth (``--depths``; He et al.'s CIFAR ResNets, 3 stages of ``--width``/2x/4x channels, 1 input
channel, Fashion-MNIST from the Debian package), one command:

1. **Baseline**: trained from scratch for ``--baseline-epochs``; a **control** fine-tunes it with the
   fine-tune schedule, so that what the extra epochs alone buy is visible.
2. **sharify** rows, each made from the trained baseline and evaluated before any update, after BatchNorm
   re-calibration (``--bn-images``, no gradients) and after ``--finetune-epochs`` of one schedule, without and
   with distillation from the baseline (``finetune(distill=True, teacher=baseline)``): full sharing
   (ShaResNet's ``last_spatial``, and ``all_spatial``), ``delta_rank`` at ``--delta-ranks`` and
   ``param_budget`` at ``--budgets`` (relaxed sharing on ``all_spatial``), and the filter-basis variant; all
   with ``init="scaled", align=True`` (``init="svd"`` for the basis), the best inits of
   ``benchmarks/results/accuracy_study``.
3. **Torch-Pruning** (the ``torch-pruning`` package's ``MetaPruner`` with L1 ``MagnitudeImportance``, uniform
   per-layer ratio, the classifier left out), at the parameter count of each full-sharing and budget row (the
   ratio found by bisection), re-calibrated and fine-tuned on the same schedule.
4. **From scratch**: the same depth made narrower (``width`` chosen for the closest parameter count) at the
   counts of ``--scratch-at`` rows, trained for ``--baseline-epochs + --finetune-epochs`` epochs.

Writes ``--out`` (default ``benchmarks/results/pareto/``): ``pareto.json`` (configuration, command, git commit,
machine, every row), ``pareto.md`` (table, the issue's targets checked) and ``pareto.png`` (top-1 after
fine-tuning against parameters, one line per method and depth).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import sharify
from benchmarks.accuracy_study import _machine, git_commit
from benchmarks.cifar_models import cifar_resnet
from benchmarks.pareto_report import write_report
from sharify.train import DataBundle, finetune, load_data
from sharify.train.batchnorm import recalibrate_batchnorm
from sharify.train.loaders import TransformedDataset, build_transforms

RESULTS = Path(__file__).parent / "results" / "pareto"


@dataclass
class Row:
    """One model of the front: its parameters and top-1 (%) at each step (``None``: step not run)."""

    depth: int
    method: str  # "baseline", "control", "sharify", "torch-pruning", "scratch"
    name: str
    params: int
    options: dict[str, Any] = field(default_factory=dict)
    before: float | None = None
    recalibrated: float | None = None
    finetuned: float | None = None
    distilled: float | None = None
    seconds: float = 0.0
    note: str = ""


class Bench:
    """The data, settings and evaluation tensors of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data: DataBundle = load_data("fashion-mnist", root=args.data_root, subset=args.subset or None,
                                          val_subset=args.val_subset or None, seed=args.seed)  # fmt: skip
        probe = cifar_resnet(20, num_classes=self.data.num_classes, in_chans=1, width=args.width)
        _, eval_tf, _ = build_transforms(self.data, probe, augment=False)
        self.val = _stack(TransformedDataset(self.data.val, eval_tf))
        calib = torch.utils.data.Subset(self.data.train, range(min(args.bn_images, len(self.data.train))))  # type: ignore[arg-type]
        self.calib = _stack(TransformedDataset(calib, eval_tf))[0]
        self.x = torch.zeros(1, 1, *(self.data.image_size or (28, 28)))

    def net(self, depth: int, width: int | None = None) -> nn.Module:
        return cifar_resnet(depth, num_classes=self.data.num_classes, in_chans=1, width=width or self.args.width)

    def top1(self, model: nn.Module) -> float:
        model.eval()
        images, labels = self.val
        correct = 0
        with torch.no_grad():
            for i in range(0, len(labels), 500):
                correct += int((model(images[i : i + 500]).argmax(1) == labels[i : i + 500]).sum())
        return 100.0 * correct / len(labels)

    def recalibrate(self, model: nn.Module) -> nn.Module:
        model = copy.deepcopy(model)
        recalibrate_batchnorm(model, [self.calib[i : i + 256] for i in range(0, len(self.calib), 256)],
                              num_images=len(self.calib))  # fmt: skip
        return model

    def train(self, model: nn.Module, name: str, *, epochs: int, lr: float, teacher: nn.Module | None = None,
              lambda_r: float = 0.0) -> tuple[nn.Module, float]:  # fmt: skip
        """``model`` trained by ``sharify.train.finetune`` (a copy), and its final top-1."""
        a = self.args
        run_dir = a.out / "runs" / name.replace(" ", "_").replace("/", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        extra: dict[str, Any] = {"distill": True, "teacher": teacher} if teacher is not None else {}
        result = finetune(
            copy.deepcopy(model), self.data, out=run_dir, epochs=epochs, lr=lr, batch_size=a.batch_size,
            weight_decay=a.weight_decay, warmup_epochs=0, seed=a.seed, quiet=True, workers=0, device="cpu",
            keep_checkpoints=1, channels_last=True, lambda_r=lambda_r, augment=True, **extra,
        )  # fmt: skip
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # weights are not results; metrics are
        (run_dir / "model.safetensors").unlink(missing_ok=True)
        return result.model, self.top1(result.model)


def _stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return images, labels


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _log(row: Row) -> None:
    steps = ", ".join(f"{k} {getattr(row, k):.2f}" for k in ("before", "recalibrated", "finetuned", "distilled")
                      if getattr(row, k) is not None)  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] ResNet-{row.depth} {row.name}: {row.params:,} params; {steps}"
          f"{'; ' + row.note if row.note else ''} ({row.seconds:.0f} s)", flush=True)  # fmt: skip


def sharify_variants(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(name, sharify options) of the sharify rows."""
    best = {"init": "scaled", "align": True}
    every = {**best, "positions": ("all_spatial",)}
    rows = [("full, last_spatial (ShaResNet)", best), ("full, all_spatial", every)]
    rows += [(f"delta_rank={r}, all_spatial", {**every, "delta_rank": r}) for r in args.delta_ranks]
    rows += [(f"param_budget={b}, all_spatial", {**every, "param_budget": b}) for b in args.budgets]
    basis = {"method": "basis", "positions": ("all_spatial",), "init": "svd", "align": True,
             "shared_rank": args.shared_rank, "unique_rank": args.unique_rank}  # fmt: skip
    rows.append((f"basis S{args.shared_rank}U{args.unique_rank} (svd), all_spatial", basis))
    return rows


def run_sharify(bench: Bench, depth: int, trained: nn.Module, name: str, options: dict[str, Any]) -> Row:
    start = time.perf_counter()
    a = bench.args
    try:
        shared = sharify.sharify(copy.deepcopy(trained), example_inputs=bench.x, **options)
    except ValueError as exc:  # e.g. a budget below full sharing on this depth
        return Row(depth, "sharify", name, 0, _jsonable(options), note=f"not run: {exc}")
    row = Row(depth, "sharify", name, _params(shared), _jsonable(options), before=bench.top1(shared))
    recal = bench.recalibrate(shared)
    row.recalibrated = bench.top1(recal)
    lambda_r = a.lambda_r if options.get("method") == "basis" else 0.0
    tag = f"d{depth} {name}"
    _, row.finetuned = bench.train(recal, tag, epochs=a.finetune_epochs, lr=a.finetune_lr, lambda_r=lambda_r)
    if a.distill:
        _, row.distilled = bench.train(recal, tag + " distill", epochs=a.finetune_epochs, lr=a.finetune_lr,
                                       teacher=trained, lambda_r=lambda_r)  # fmt: skip
    row.seconds = time.perf_counter() - start
    return row


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def prune_to(model: nn.Module, target: int, x: torch.Tensor) -> tuple[nn.Module, float]:
    """``model`` pruned by Torch-Pruning (L1 magnitude, uniform ratio) to about ``target`` parameters."""
    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        fc = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                      ignored_layers=fc)  # fmt: skip
        pruner.step()
        return m

    lo, hi = 0.0, 0.95
    for _ in range(14):  # bisection on the ratio: parameters fall with it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _params(pruned(mid)) > target else (lo, mid)
    best = min((lo, hi), key=lambda r: abs(_params(pruned(r)) - target))
    return pruned(best), best


def run_pruning(bench: Bench, depth: int, trained: nn.Module, target: int, at: str) -> Row:
    start = time.perf_counter()
    model, ratio = prune_to(trained.eval(), target, bench.x)
    row = Row(depth, "torch-pruning", f"L1 pruning at {at}", _params(model), {"pruning_ratio": round(ratio, 4)},
              before=bench.top1(model))  # fmt: skip
    recal = bench.recalibrate(model)
    row.recalibrated = bench.top1(recal)
    a = bench.args
    _, row.finetuned = bench.train(recal, f"d{depth} prune {at}", epochs=a.finetune_epochs, lr=a.finetune_lr)
    if a.distill and a.distill_pruning:
        _, row.distilled = bench.train(recal, f"d{depth} prune {at} distill", epochs=a.finetune_epochs,
                                       lr=a.finetune_lr, teacher=trained)  # fmt: skip
    row.seconds = time.perf_counter() - start
    return row


def run_scratch(bench: Bench, depth: int, target: int, at: str) -> Row:
    start = time.perf_counter()
    widths = range(2, bench.args.width + 1)
    width = min(widths, key=lambda w: abs(_params(bench.net(depth, w)) - target))
    torch.manual_seed(bench.args.seed)
    model = bench.net(depth, width)
    a = bench.args
    _, top1 = bench.train(model, f"d{depth} scratch w{width}", epochs=a.baseline_epochs + a.finetune_epochs, lr=a.lr)
    row = Row(depth, "scratch", f"ResNet-{depth}, width {width}, from scratch (at {at})", _params(model),
              {"width": width}, finetuned=top1, seconds=time.perf_counter() - start)  # fmt: skip
    return row


def run_depth(bench: Bench, depth: int) -> list[Row]:
    a = bench.args
    torch.manual_seed(a.seed)
    start = time.perf_counter()
    trained, top1 = bench.train(bench.net(depth), f"d{depth} baseline", epochs=a.baseline_epochs, lr=a.lr)
    trained.eval()
    rows = [Row(depth, "baseline", f"ResNet-{depth} baseline", _params(trained), before=top1,
                seconds=time.perf_counter() - start)]  # fmt: skip
    _log(rows[-1])
    start = time.perf_counter()
    _, control = bench.train(trained, f"d{depth} control", epochs=a.finetune_epochs, lr=a.finetune_lr)
    rows.append(Row(depth, "control", "baseline + the same fine-tune (control)", rows[0].params, before=top1,
                    finetuned=control, seconds=time.perf_counter() - start))  # fmt: skip
    _log(rows[-1])
    for name, options in sharify_variants(a):
        rows.append(run_sharify(bench, depth, trained, name, options))
        _log(rows[-1])
    targets = {r.name: r.params for r in rows if r.method == "sharify" and r.params and "delta_rank" not in r.name
               and "basis" not in r.name}  # fmt: skip
    for at, count in targets.items():
        rows.append(run_pruning(bench, depth, trained, count, at))
        _log(rows[-1])
    for at, count in targets.items():
        if any(s in at for s in a.scratch_at):
            rows.append(run_scratch(bench, depth, count, at))
            _log(rows[-1])
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The defaults are sized for about 75 minutes on an idle 2-core machine (measured training rates in
    # sharify.train.finetune with augmentation, batch 64, 2 threads: ResNet-20 ~900 images/s, ResNet-56
    # ~380): 10,000 training and 2,000 test images, 10 + 2 epochs, one seed. The committed front
    # (results/pareto) is this default command.
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--subset", type=int, default=10_000, help="training images (0: all 60,000)")
    p.add_argument("--val-subset", type=int, default=2_000, help="test images (0: all 10,000)")
    p.add_argument("--baseline-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--finetune-lr", type=float, default=0.005)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bn-images", type=int, default=1024)
    p.add_argument("--delta-ranks", type=int, nargs="+", default=[2, 8])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.65, 0.75, 0.8])
    p.add_argument("--shared-rank", type=int, default=24)
    p.add_argument("--unique-rank", type=int, default=8)
    p.add_argument("--lambda-r", type=float, default=10.0, help="orthogonality regulariser of the basis rows")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--distill-pruning", action=argparse.BooleanOptionalAction, default=True,
                   help="also distil the pruned models (the same teacher)")  # fmt: skip
    p.add_argument("--scratch-at", nargs="+", default=["full, all_spatial", "param_budget=0.65"],
                   help="rows whose parameter count a narrower net is trained at from scratch")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="every step on a tiny subset (a test, not a result)")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="table and plot from pareto.json files (e.g. one per depth), no training")  # fmt: skip
    return p


def smoke(args: argparse.Namespace) -> None:
    args.depths, args.subset, args.val_subset = [14], 128, 64
    args.baseline_epochs, args.finetune_epochs, args.bn_images = 1, 1, 32
    args.delta_ranks, args.budgets, args.batch_size, args.width = [2], [0.6, 0.8], 32, 8
    args.scratch_at = ["param_budget=0.8"]


def merge(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One payload of several runs (e.g. one per depth, each with its own data budget): their rows, and each run's
    command, commit, data and settings as a ``part`` that its rows point to."""
    parts: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for payload in payloads:
        offset = len(parts)
        parts += payload.get("parts", [payload])
        rows += [{**r, "part": r.get("part", 0) + offset} for r in payload["rows"]]
    keep = ("command", "seconds", "git_commit", "machine", "data", "args")
    return {"parts": [{k: p[k] for k in keep if k in p} for p in parts], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.from_json:
        write_report(merge([json.loads(Path(f).read_text()) for f in args.from_json]), args.out)
        return 0
    if args.smoke:
        smoke(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bench = Bench(args)
    rows: list[Row] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for depth in args.depths:
        rows += run_depth(bench, depth)
        payload = {  # written after every depth, so a long run keeps what it finished
            "command": " ".join(["python -m benchmarks.pareto", *(sys.argv[1:] if argv is None else argv)]),
            "seconds": time.perf_counter() - start, "git_commit": git_commit(), "machine": _machine(),
            "data": {"source": str(bench.data.source), "train_images": len(bench.data.train),
                     "val_images": len(bench.data.val)},
            "args": {k: str(v) for k, v in vars(args).items()}, "rows": [asdict(r) for r in rows],
        }  # fmt: skip
        (args.out / "pareto.json").write_text(json.dumps(payload, indent=2, default=str))
    write_report(merge([json.loads((args.out / "pareto.json").read_text())]), args.out)
    print(f"wrote {args.out}/pareto.json, pareto.md, pareto.png in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
