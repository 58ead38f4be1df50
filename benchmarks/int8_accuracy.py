"""int8 against float on the Fashion-MNIST study's model: test accuracy and eager inference speed (issue 17).

    python -m benchmarks.int8_accuracy           # the committed run (CPU, 2 threads: ~7 min on 2 shared cores)
    python -m benchmarks.int8_accuracy --smoke   # a ~1 minute check of every step (written to a temp dir)

The model of :mod:`benchmarks.accuracy_study` (He et al.'s CIFAR ResNet-20, 16/32/64 channels, 1 input
channel), trained here from scratch (no checkpoint of the study is committed: it keeps metrics, not weights)
on the study's data (a fixed random 15,000 Fashion-MNIST training images, 5,000 test images, seed 0) for
``--baseline-epochs`` at the study's learning rate, through :func:`sharify.train.finetune`. It is sharified
the way the study found best before fine-tuning (``init="scaled", align=True`` with BatchNorm re-calibration
on 1,024 images, 85.8 % there against 85.7 % for aligned ``average``) and fine-tuned for
``--finetune-epochs`` at a gentler learning rate than the study's (one epoch at 0.02 *lowered* that variant
there). Then, on the test images: the top-1 accuracy of each model in float32 and after
:func:`sharify.quantize_int8` (weight-only int8, one scale per output channel, each shared tensor quantised
once) -- the original, the shared model, and the shared model with its BatchNorms folded
(:func:`sharify.fold_batchnorm`) -- with the share of test images on which int8 and float predict the same
class, and the bytes of each int8 state_dict as safetensors.

Speed: eager PyTorch inference (``torch.no_grad``, eval mode, ``--threads`` threads) of each int8 model against
its float model, all six timed in interleaved rounds as in :mod:`benchmarks.perf` (order alternating, a round of
batch 1 times 8 calls of each); the ratio int8 / float is the median of the per-round ratios with its
distribution-free 95 % confidence interval. The int8 model dequantises every weight in every forward
(a cast and a multiply), so it is expected to be slower than float, not faster: weight-only int8 saves bytes.

Results go to ``benchmarks/results/int8_accuracy.json`` and ``.md``, with the command and the git commit.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

import sharify
from benchmarks.accuracy_study import git_commit
from benchmarks.cifar_models import cifar_resnet
from benchmarks.perf import interleaved, machine, median_ci
from sharify.train import DataBundle, finetune, load_data
from sharify.train.loaders import build_transforms

RESULTS = Path(__file__).parent / "results"
#: The models compared, each in float32 and int8: (label, how it is made from the original and the shared model).
MODELS: dict[str, Callable[[nn.Module, nn.Module], nn.Module]] = {
    "original": lambda original, shared: original,
    "shared": lambda original, shared: shared,
    "shared, folded BN": lambda original, shared: sharify.fold_batchnorm(shared),
}


def _train(model: nn.Module, data: DataBundle, args: argparse.Namespace, work: Path, name: str, **options: Any) -> Any:
    """``sharify.train.finetune`` on the CPU with the study's batch size, weight decay and no warm-up."""
    result = finetune(
        model, data, out=work / name, batch_size=args.batch_size, weight_decay=5e-4, warmup_epochs=0, seed=args.seed,
        quiet=True, workers=0, keep_checkpoints=1, device="cpu", channels_last=True, **options,
    )  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {name}: " + ", ".join(f"e{m['epoch']} {m['top1']:.2f}" for m in
          result.metrics), flush=True)  # fmt: skip
    return result


def trained_models(data: DataBundle, args: argparse.Namespace, work: Path) -> tuple[nn.Module, nn.Module, dict]:
    """The trained original, its sharified and fine-tuned copy (both eval mode, contiguous weights) and the
    accuracies ``finetune`` logged along the way."""
    torch.manual_seed(args.seed)
    original = cifar_resnet(args.depth, num_classes=data.num_classes, in_chans=1, width=args.width)
    run = _train(original, data, args, work, "baseline", epochs=args.baseline_epochs, lr=args.lr)
    original = run.model.eval()
    x = torch.zeros(1, 1, *(data.image_size or (28, 28)))
    shared = sharify.sharify(copy.deepcopy(original), example_inputs=x, init="scaled", align=True)
    tuned = _train(shared, data, args, work, "shared", epochs=args.finetune_epochs, lr=args.finetune_lr,
                   bn_recalibrate=args.bn_images, eval_before=True, original=original)  # fmt: skip
    logged = {"baseline": [m["top1"] for m in run.metrics], "shared": [m["top1"] for m in tuned.metrics]}
    contiguous = lambda m: m.to(memory_format=torch.contiguous_format).eval()  # noqa: E731
    return contiguous(original), contiguous(tuned.model), logged


def test_tensors(data: DataBundle, model: nn.Module) -> tuple[Tensor, Tensor]:
    """The test images as one normalised batch (the evaluation transform ``finetune`` uses) and their labels."""
    _, transform, _ = build_transforms(data, model, augment=False)
    images, labels = zip(*((transform(img), label) for img, label in data.val))
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def predictions(model: nn.Module, images: Tensor, batch: int = 500) -> Tensor:
    """The class ``model`` predicts for each image."""
    return torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])


def accuracy_rows(models: dict[str, dict[str, nn.Module]], images: Tensor, labels: Tensor) -> list[dict[str, Any]]:
    """Float and int8 top-1 of each model, the int8/float agreement and the int8 file bytes."""
    rows = []
    for label, pair in models.items():
        pred = {kind: predictions(m, images) for kind, m in pair.items()}
        top1 = {kind: 100.0 * (p == labels).float().mean().item() for kind, p in pred.items()}
        state = {k: v.contiguous() for k, v in pair["int8"].state_dict().items()}
        rows.append({
            "model": label, "params": sum(p.numel() for p in pair["float"].parameters()),
            "float_top1": top1["float"], "int8_top1": top1["int8"], "int8_minus_float": top1["int8"] - top1["float"],
            "agreement": 100.0 * (pred["int8"] == pred["float"]).float().mean().item(),
            "int8_safetensors_bytes": len(save_safetensors(state)),
        })  # fmt: skip
        print(f"{label:18s} float {top1['float']:.2f}  int8 {top1['int8']:.2f}  agree {rows[-1]['agreement']:.2f}")
    return rows


def _runner(model: nn.Module, x: Tensor, calls: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            for _ in range(calls):
                model(x)

    return run


def speed_rows(models: dict[str, dict[str, nn.Module]], images: Tensor, args: argparse.Namespace) -> list[dict]:
    """int8 / float eager inference time of each model, all timed interleaved, at each batch size."""
    rows = []
    for batch in args.batches:
        x = images[:batch].contiguous()
        calls = max(1, 8 // batch)

        fns = {f"{label}/{kind}": _runner(m, x, calls) for label, pair in models.items() for kind, m in pair.items()}
        times = interleaved(fns, torch.device("cpu"), args.warmup, args.repeats)
        for label in models:
            fl, q = times[f"{label}/float"], times[f"{label}/int8"]
            paired = [b / a for a, b in zip(fl, q, strict=True)]
            ratio, ci = statistics.median(paired), median_ci(paired)
            rows.append({"model": label, "batch": batch, "float_ms": 1e3 * statistics.median(fl) / calls,
                         "int8_ms": 1e3 * statistics.median(q) / calls, "ratio": ratio, "ratio_ci95": list(ci),
                         "repeats": args.repeats, "warmup": args.warmup, "calls_per_round": calls})  # fmt: skip
            print(f"{label:18s} batch {batch}: int8 / float {ratio:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})", flush=True)
    return rows


def markdown(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        "# int8 against float on the Fashion-MNIST study's model",
        "",
        f"Command: `{results['command']}` (git commit `{results['git_commit']}`, {results['seconds'] / 60:.1f} min)",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores, {s['threads']} torch threads; Python {m['python']}, "
        f"torch {m['torch']}, sharify {m['sharify']}.",
        "",
        f"Model: CIFAR ResNet-{s['depth']} (width {s['width']}, 1 input channel) trained from scratch for "
        f"{s['baseline_epochs']} epochs (lr {s['lr']}) on {results['data']['train_images']:,} Fashion-MNIST training "
        f'images; sharified with `init="scaled", align=True`, BatchNorm re-calibrated on {s["bn_images"]:,} images '
        f"and fine-tuned for {s['finetune_epochs']} epoch(s) (lr {s['finetune_lr']}). Test: "
        f"{results['data']['test_images']:,} test images. int8: `sharify.quantize_int8` (weight-only, one scale "
        "per output channel, each shared tensor quantised once); folded BN: `sharify.fold_batchnorm` first.",
        "",
        "## Test accuracy (top-1, %)",
        "",
        "| model | parameters | float32 | int8 | int8 - float | same prediction | int8 safetensors MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["accuracy"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['float_top1']:.2f} | {r['int8_top1']:.2f} | "
                     f"{r['int8_minus_float']:+.2f} | {r['agreement']:.2f} | "
                     f"{r['int8_safetensors_bytes'] / 1e6:.3f} |")  # fmt: skip
    lines += [
        "",
        "## Eager inference time, int8 / float (PyTorch, CPU)",
        "",
        "The six models timed in interleaved rounds (order alternating; a round of batch 1 times 8 calls of each); "
        "the ratio is the median of the per-round ratios int8 / float with the distribution-free 95% confidence "
        "interval of that median. The int8 models dequantise every weight in every forward.",
        "",
        "| model | batch | float ms | int8 ms | int8 / float | 95% CI |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results["speed"]:
        low, high = r["ratio_ci95"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['float_ms']:.2f} | {r['int8_ms']:.2f} | {r['ratio']:.3f} | "
                     f"{low:.3f}-{high:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--subset", type=int, default=15_000, help="training images (the study's)")
    p.add_argument("--val-subset", type=int, default=5_000, help="test images (the study's)")
    p.add_argument("--baseline-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--bn-images", type=int, default=1024)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256], help="batch sizes of the speed test")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results (--smoke: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny model, subsets and rounds: every step in ~1 minute")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.subset, args.val_subset = 14, 8, 256, 256
        args.baseline_epochs, args.bn_images, args.batches, args.repeats, args.warmup = 1, 64, [1, 32], 3, 1
    out = args.out or (Path(tempfile.mkdtemp(prefix="sharify-int8-")) if args.smoke else RESULTS)
    command = ("python -m benchmarks.int8_accuracy " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    commit, start = git_commit(), time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load_data("fashion-mnist", root=args.data_root, subset=args.subset, val_subset=args.val_subset,
                     seed=args.seed)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sharify-int8-runs-") as work:
        original, shared, logged = trained_models(data, args, Path(work))
    images, labels = test_tensors(data, original)
    models = {}
    for label, make in MODELS.items():
        model = make(original, shared).eval()
        models[label] = {"float": model, "int8": sharify.quantize_int8(model).eval()}
    results: dict[str, Any] = {
        "command": command, "git_commit": commit, "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"source": str(data.source), "train_images": len(data.train), "test_images": len(labels)},
        "finetune_top1": logged, "accuracy": accuracy_rows(models, images, labels),
        "speed": speed_rows(models, images, args),
    }  # fmt: skip
    results["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "int8_accuracy.md").write_text(markdown(results))
    print(f"results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
