"""Fine-tune a sharified timm model with timm's own training components.

Integration point (3): timm parts work on a sharified model unchanged, with one adjustment for
layer decay -- build the parameter groups with ``sharify.train.param_groups`` (each shared tensor
once, placed at its first member's layer; timm alone would give it the head's learning rate):

* ``timm.optim.create_optimizer_v2`` on those groups, ``timm.scheduler.CosineLRScheduler``;
* ``timm.utils.ModelEmaV3`` (moves the shared weight by one EMA step per update);
* ``timm.utils.CheckpointSaver`` (``checkpoint-N.pth.tar`` / ``model_best.pth.tar``);
* ``model.set_grad_checkpointing()`` (reentrant or not: ``timm.layers.set_reentrant_ckpt``).

    python examples/timm_style.py --model resnet18 --data fashion-mnist --subset 512 --epochs 1
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import timm
import torch
from timm.data import create_transform
from timm.layers import set_reentrant_ckpt
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import CheckpointSaver, ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

import sharify
from sharify.train import load_data, param_groups
from sharify.train.loaders import TransformedDataset


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root")
    p.add_argument("--subset", type=int)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--grad-checkpointing", choices=("off", "reentrant", "non-reentrant"), default="off")
    p.add_argument("--out", default="timm_checkpoints")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    data = load_data(args.data, root=args.data_root, subset=args.subset)
    size = (data.image_size or (224, 224))[0]
    model = timm.create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans)
    model = sharify.sharify(model, example_inputs=torch.zeros(1, data.in_chans, size, size))
    if args.grad_checkpointing != "off":
        set_reentrant_ckpt(args.grad_checkpointing == "reentrant")
        model.set_grad_checkpointing(True)

    mean, std = (0.5,) * data.in_chans, (0.5,) * data.in_chans
    train_tf = create_transform((data.in_chans, size, size), is_training=True, mean=mean, std=std, scale=(0.5, 1.0))
    val_tf = create_transform((data.in_chans, size, size), is_training=False, mean=mean, std=std, crop_pct=1.0)
    train = DataLoader(
        TransformedDataset(data.train, train_tf), batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    val = DataLoader(TransformedDataset(data.val, val_tf), batch_size=2 * args.batch_size)

    groups = param_groups(model, weight_decay=0.05, layer_decay=args.layer_decay)
    optimizer = create_optimizer_v2(groups, "adamw", lr=args.lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * len(train), t_in_epochs=False)
    ema = ModelEmaV3(model, decay=0.99)
    os.makedirs(args.out, exist_ok=True)
    saver = CheckpointSaver(
        model, optimizer, model_ema=ema, checkpoint_dir=args.out, recovery_dir=args.out, max_history=1
    )
    loss_fn = nn.CrossEntropyLoss()
    updates = 0
    for epoch in range(args.epochs):
        model.train()
        for images, labels in train:
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
            ema.update(model, step=updates)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val:
                correct += int((ema.module(images).argmax(1) == labels).sum())
                total += len(labels)
        top1 = 100.0 * correct / total
        best, best_epoch = saver.save_checkpoint(epoch, metric=top1)
        print(f"epoch {epoch}: loss {loss.item():.4f}, EMA top1 {top1:.2f}% (best {best:.2f}% at epoch {best_epoch})")
    return {"top1": top1}


if __name__ == "__main__":
    main()
