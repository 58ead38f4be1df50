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

from .._argtypes import finite_float, positive_int, write_stdout
from ..planning.options import option_fields, option_flag

__all__ = ["add_finetune_options", "config_from_args", "run_finetune"]

GPU_EXAMPLE = (
    "sharify finetune --model resnet50 --pretrained --data /data/imagenet --num-classes 1000 --epochs 10 "
    "--out runs/r50 --device cuda --amp bf16 --channels-last --compile"
)


def add_finetune_options(p: argparse.ArgumentParser) -> None:
    """Adds the model, data, training, hardware and output options of ``sharify finetune`` to ``p``, in that order.

    Argument types check the form of each value (integers >= 1 where zero makes no sense, finite numbers);
    :meth:`~sharify.train.FinetuneConfig.validate` and :func:`check_combinations` check ranges and combinations.
    """
    _add_model_options(p)
    _add_data_options(p)
    _add_training_options(p)
    _add_distill_options(p)
    _add_hardware_options(p)
    _add_output_options(p)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The model options: which network, its original weights, its head and input channels, sharing on/off."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="timm or torchvision name: resnet50, timm:resnet18, tv:resnet34")
    g.add_argument("--pretrained", action="store_true", help="the library's pretrained weights (needs internet)")
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="original (unshared) weights to load before sharifying (a state_dict, or a "
        "training checkpoint such as timm's .pth.tar: its state_dict)",
    )
    g.add_argument("--checkpoint-ema", action="store_true", help="load the --checkpoint's EMA weights (state_dict_ema)")
    g.add_argument("--num-classes", type=positive_int, help="classifier size (default: the data's classes)")
    g.add_argument(
        "--in-chans", type=positive_int, help="input channels of timm models built by name (default: the data's)"
    )
    g.add_argument("--no-sharify", dest="share", action="store_false", help="train the model unshared (baselines)")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """The data options: which images, how many, their size, augmentation and loader processes."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="ImageFolder dir (train/, val/), fashion-mnist, cifar10 or cifar100")
    g.add_argument("--data-root", metavar="DIR", help="directory of fashion-mnist/cifar files")
    g.add_argument("--subset", type=positive_int, metavar="N", help="use N training (and val) images: smoke runs")
    g.add_argument("--val-subset", type=positive_int, metavar="N", help="validation images (default: --subset)")
    g.add_argument("--image-size", type=positive_int, metavar="PX", help="input size (default: from the data / model)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop/flip")
    g.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The training options: epochs, batches, optimizer and schedule, loss, accumulation, EMA, seed."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=128, help="per process (default 128)")
    g.add_argument("--eval-batch-size", type=positive_int)
    g.add_argument("--opt", default="sgd", help="timm optimizer: sgd (default), adamw, ...")
    g.add_argument("--lr", type=finite_float, default=0.05)
    g.add_argument("--momentum", type=finite_float, help="optimizers with momentum: sgd, rmsprop, ... (default 0.9)")
    g.add_argument("--weight-decay", type=finite_float, default=5e-4)
    g.add_argument("--layer-decay", type=finite_float, help="layer-wise lr decay in (0, 1]")
    g.add_argument("--warmup-epochs", type=finite_float, default=0.0)
    g.add_argument("--min-lr", type=finite_float, default=0.0)
    g.add_argument("--label-smoothing", type=finite_float, default=0.0)
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per update")
    g.add_argument("--clip-grad", type=finite_float, metavar="NORM")
    g.add_argument("--ema", dest="ema_decay", type=finite_float, metavar="DECAY", help="keep a timm ModelEmaV3")
    g.add_argument("--bn-recalibrate", type=int, default=0, metavar="N", help="re-estimate BN stats on N images first")
    g.add_argument("--lambda-r", type=finite_float, default=0.0, help="orthogonality regulariser weight (basis models)")
    g.add_argument("--eval-before", action="store_true", help="evaluate before training (metrics epoch 0)")
    g.add_argument("--seed", type=int, default=0)


def _add_distill_options(p: argparse.ArgumentParser) -> None:
    """The distillation options: learn from the unshared original's outputs too (:mod:`sharify.train.distill`)."""
    g = p.add_argument_group("distillation (from the unshared original; see FinetuneConfig)")
    g.add_argument(
        "--distill",
        action="store_true",
        help="loss (1-A)*CE + A*T^2*KL(original/T || model/T): the original (--checkpoint/--pretrained, frozen, "
        "eval mode) teaches the sharified model; one extra forward per batch",
    )
    g.add_argument("--distill-temperature", type=finite_float, metavar="T", help="softmax temperature (default 4)")
    g.add_argument("--distill-weight", type=finite_float, metavar="A", help="weight of the KL term in [0, 1] (0.9)")
    g.add_argument(
        "--distill-features",
        action="store_true",
        help="also match the outputs of the residual stages holding shared groups (mean squared error)",
    )
    g.add_argument("--distill-feature-weight", type=finite_float, metavar="B", help="weight of that term (default 1)")


def _add_hardware_options(p: argparse.ArgumentParser) -> None:
    """The hardware options: device, mixed precision, memory format, compilation, SyncBatchNorm."""
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    g.add_argument(
        "--amp", default="auto", choices=("auto", "none", "bf16", "fp16"), help="auto: bf16 on CUDA, fp32 on CPU"
    )
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true", help="timm models: activation checkpointing")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (CUDA)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """The output options: the output directory, resuming, retained checkpoints, logging."""
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/finetune", help="output directory (default runs/finetune)")
    resume_help = "continue from the newest checkpoint in --out (same settings; --epochs may grow)"
    g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument(
        "--resume-fallback",
        action="store_true",
        help="with --resume: if the newest checkpoint fails its checksums, resume from the newest intact one "
        "(kept with --keep-checkpoints 2 or more); without it a corrupt checkpoint is refused",
    )
    g.add_argument("--keep-checkpoints", type=int, default=1)
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch log lines")


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~sharify.train.FinetuneConfig` of parsed ``sharify finetune`` arguments."""
    from .finetune import FinetuneConfig

    given = {f.name: getattr(args, f.name, None) for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in given.items() if v is not None})  # unset: the config's default


def run_finetune(args: argparse.Namespace, sharing: dict[str, Any]) -> int:
    """Runs ``sharify finetune`` for parsed ``args`` and :func:`sharify.sharify` keyword arguments."""
    from .checkpoint import latest_checkpoint
    from .data import load_data
    from .errors import CheckpointError
    from .finetune import FinetuneConfig, finetune
    from .loaders import model_in_chans
    from .model import prepare_models
    from .rng import seed_everything

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not args.quiet:
        logging.getLogger("sharify.train").setLevel(logging.INFO)
    config = config_from_args(args)
    config.validate()
    check_combinations(args)
    if args.resume and latest_checkpoint(args.out) is None:
        raise CheckpointError(
            f"--resume: {args.out} holds no complete checkpoint (none is written before the first epoch ends); "
            "start the run without --resume"
        )
    # the model's random init (head, random/basis sharing init) follows --seed: the same command, the same weights
    seed_everything(args.seed)
    data = load_data(args.data, root=args.data_root, subset=args.subset, val_subset=args.val_subset, seed=args.seed)
    size = (args.image_size,) * 2 if args.image_size else data.image_size
    original, model, new_head = prepare_models(
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
    if args.in_chans and args.checkpoint and model_in_chans(original) != args.in_chans:
        raise ValueError(
            f"--in-chans {args.in_chans} has no effect with --checkpoint: the model takes the checkpoint's "
            f"{model_in_chans(original)} input channels; drop --in-chans (the data is converted to fit)"
        )
    if config.distill and config.distill_weight > 0 and new_head:
        raise ValueError(
            f"--distill: the original's classifier was replaced for {args.num_classes or data.num_classes} classes "
            "(the weights loaded have another head), so its outputs are random and teach nothing; distil from an "
            "original trained on these classes, or match only the stage outputs: --distill-weight 0 --distill-features"
        )
    own = {f.name for f in fields(FinetuneConfig)} | {"func", "command", "debug"}
    setup = {k: v for k, v in vars(args).items() if k not in own}  # model, data and sharing options
    teacher = original if config.distill else None  # rebuilt the same way on --resume (same options, same --seed)
    result = finetune(model, data, config, original=original if args.share else None, teacher=teacher, setup=setup)
    if rank == 0 and not args.quiet:
        final = result.final
        write_stdout(
            f"{result.out}: top1 {final.get('top1', float('nan')):.2f}% after {config.epochs} epoch(s); "
            f"weights in {result.out / 'model.safetensors'}"
        )
    return 0


#: Sharing options (``sharify finetune --help``, group "sharing") by their argparse destination.
_SHARING_FLAGS = {
    **{f.name: option_flag(f.name) for f in option_fields()},
    "input_size": "--input-size",
    "leaf_modules": "--leaf-modules",
}


def check_combinations(args: argparse.Namespace) -> None:
    """Refuses options that would do nothing in the given combination (instead of ignoring them silently).

    Raises:
        ValueError: Naming the option without effect and what it needs.
    """
    from ..io.zoo import resolve_model_name

    if not args.share:
        unused = [flag for dest, flag in _SHARING_FLAGS.items() if getattr(args, dest, None) not in (None, False)]
        if unused:
            raise ValueError(f"{', '.join(unused)} configure sharing, which --no-sharify turns off; drop them")
    if args.checkpoint_ema and not args.checkpoint:
        raise ValueError("--checkpoint-ema selects the EMA weights of a --checkpoint file; pass --checkpoint PATH")
    if args.momentum is not None and not _has_momentum(args.opt):
        raise ValueError(f"--momentum has no effect with --opt {args.opt}, which has no momentum; drop --momentum")
    if args.pretrained and args.checkpoint:
        raise ValueError("--pretrained and --checkpoint both give the original weights; pass one of them")
    if args.in_chans and resolve_model_name(args.model).library != "timm":
        raise ValueError(
            f"--in-chans applies to timm models; torchvision's {args.model} takes 3 channels and the data is "
            "converted to fit; drop --in-chans"
        )
    if args.data_root and not _named_data(args.data):
        raise ValueError(
            f"--data-root is the directory of fashion-mnist/cifar files; with --data {args.data} (a directory) it "
            "is not used; drop it"
        )
    _check_distill(args)
    if args.sync_bn and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ValueError("--sync-bn synchronises BatchNorm between torchrun processes; with one process drop it")


def _check_distill(args: argparse.Namespace) -> None:
    """Refuses distillation options without ``--distill``, and ``--distill`` without a trained original."""
    for flag, needed in (
        ("distill_temperature", "distill"),
        ("distill_weight", "distill"),
        ("distill_features", "distill"),
        ("distill_feature_weight", "distill_features"),
    ):
        if getattr(args, flag, None) not in (None, False) and not getattr(args, needed):
            name, needed_flag = (f"--{n.replace('_', '-')}" for n in (flag, needed))
            raise ValueError(f"{name} has no effect without {needed_flag}; pass {needed_flag} or drop {name}")
    if not args.distill:
        return
    if not args.share:
        raise ValueError(
            "--distill teaches the sharified model with the unshared original; with --no-sharify the model trained "
            "is the original itself; drop --distill or --no-sharify"
        )
    if not (args.checkpoint or args.pretrained):
        raise ValueError(
            "--distill learns from the original model, which without --checkpoint or --pretrained has random "
            "weights; pass the trained original with --checkpoint PATH (or --pretrained)"
        )


def _named_data(spec: str) -> bool:
    return spec.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist", "cifar10", "cifar100")


def _has_momentum(opt: str) -> bool:
    from timm.optim import get_optimizer_info

    try:
        return bool(get_optimizer_info(opt.lower()).has_momentum)
    except (ValueError, KeyError):  # an unknown name: create_optimizer names it
        return True
