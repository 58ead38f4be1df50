"""The ``sharify finetune`` command: options, and the glue from them to :func:`sharify.train.finetune`.

``sharify finetune --model NAME --data DATA --out DIR`` builds the model, loads original weights,
fits the head to the data, sharifies it (unless ``--no-sharify``), writes the parameter report and
trains. The same command runs data-parallel under ``torchrun --nproc_per_node N -m sharify finetune``.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import fields
from typing import Any

__all__ = ["add_finetune_options", "config_from_args", "run_finetune"]

GPU_EXAMPLE = (
    "sharify finetune --model resnet50 --pretrained --data /data/imagenet --num-classes 1000 --epochs 10 "
    "--out runs/r50 --device cuda --amp bf16 --channels-last --compile"
)


def add_finetune_options(p: argparse.ArgumentParser) -> None:
    """Adds the model, data, training and output options of ``sharify finetune`` to ``p``."""
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="timm or torchvision name: resnet50, timm:resnet18, tv:resnet34")
    m.add_argument("--pretrained", action="store_true", help="the library's pretrained weights (needs internet)")
    m.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="original (unshared) weights to load before sharifying (a state_dict, or a "
        "training checkpoint such as timm's .pth.tar: its state_dict)",
    )
    m.add_argument("--checkpoint-ema", action="store_true", help="load the checkpoint's EMA weights (state_dict_ema)")
    m.add_argument("--num-classes", type=int, help="classifier size (default: the data's classes); replaces the head")
    m.add_argument("--in-chans", type=int, help="input channels of timm models (default: the data's)")
    m.add_argument("--no-sharify", dest="share", action="store_false", help="train the model unshared (baselines)")

    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="ImageFolder dir (train/, val/), fashion-mnist, cifar10 or cifar100")
    d.add_argument("--data-root", metavar="DIR", help="directory of fashion-mnist/cifar files")
    d.add_argument("--subset", type=int, metavar="N", help="use N training (and validation) images, for smoke runs")
    d.add_argument("--val-subset", type=int, metavar="N", help="validation images (default: --subset)")
    d.add_argument("--image-size", type=int, metavar="PX", help="input size (default: from the data / model)")
    d.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop/flip")
    d.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=128, help="per process (default 128)")
    t.add_argument("--eval-batch-size", type=int)
    t.add_argument("--opt", default="sgd", help="timm optimizer: sgd (default), adamw, ...")
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--layer-decay", type=float, help="layer-wise lr decay (shared tensors: first member's layer)")
    t.add_argument("--warmup-epochs", type=float, default=0.0)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--accum-steps", type=int, default=1, help="micro-batches per update")
    t.add_argument("--clip-grad", type=float, metavar="NORM")
    t.add_argument("--ema", dest="ema_decay", type=float, metavar="DECAY", help="keep a timm ModelEmaV3")
    t.add_argument("--bn-recalibrate", type=int, default=0, metavar="N", help="re-estimate BN stats on N images first")
    t.add_argument("--lambda-r", type=float, default=0.0, help="orthogonality regulariser weight (basis models)")
    t.add_argument("--eval-before", action="store_true", help="evaluate before training (metrics epoch 0)")
    t.add_argument("--seed", type=int, default=0)

    h = p.add_argument_group("hardware")
    h.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    h.add_argument(
        "--amp", default="auto", choices=("auto", "none", "bf16", "fp16"), help="auto: bf16 on CUDA, fp32 on CPU"
    )
    h.add_argument("--channels-last", action="store_true")
    h.add_argument("--compile", action="store_true", help="torch.compile the model")
    h.add_argument("--grad-checkpointing", action="store_true", help="timm models: activation checkpointing")
    h.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (CUDA)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs/finetune", help="output directory (default runs/finetune)")
    resume_help = "continue from the newest checkpoint in --out (same settings; --epochs may grow)"
    o.add_argument("--resume", action="store_true", help=resume_help)
    o.add_argument("--keep-checkpoints", type=int, default=1)
    o.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch log lines")


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~sharify.train.FinetuneConfig` of parsed ``sharify finetune`` arguments."""
    from .finetune import FinetuneConfig

    return FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if hasattr(args, f.name)})


def run_finetune(args: argparse.Namespace, sharing: dict[str, Any]) -> int:
    """Runs ``sharify finetune`` for parsed ``args`` and :func:`sharify.sharify` keyword arguments."""
    from .data import load_data
    from .finetune import FinetuneConfig, finetune
    from .model import prepare_model

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not args.quiet:
        logging.getLogger("sharify.train").setLevel(logging.INFO)
    config = config_from_args(args)
    config.validate()
    data = load_data(args.data, root=args.data_root, subset=args.subset, val_subset=args.val_subset, seed=args.seed)
    size = (args.image_size,) * 2 if args.image_size else data.image_size
    original, model = prepare_model(
        args.model,
        num_classes=args.num_classes or data.num_classes,
        in_chans=args.in_chans or data.in_chans,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        checkpoint_ema=args.checkpoint_ema,
        share=args.share,
        sharing=sharing,
        input_size=size,
    )
    own = {f.name for f in fields(FinetuneConfig)} | {"func", "command", "debug"}
    setup = {k: v for k, v in vars(args).items() if k not in own}  # model, data and sharing options
    result = finetune(model, data, config, original=original if args.share else None, setup=setup)
    if rank == 0 and not args.quiet:
        final = result.final
        print(
            f"{result.out}: top1 {final.get('top1', float('nan')):.2f}% after {config.epochs} epoch(s); "
            f"weights in {result.out / 'model.safetensors'}"
        )
    return 0
