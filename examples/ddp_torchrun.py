"""Data-parallel fine-tuning of a sharified timm model with a hand-written DDP loop.

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --data fashion-mnist --subset 512
    torchrun --nproc_per_node 8 examples/ddp_torchrun.py --device cuda --data /data/imagenet ...

Rules for sharified models under DDP:

* sharify the bare model, then wrap it: ``DDP(sharify.sharify(model))`` (sharify refuses a DDP
  wrapper: DDP has already registered the unshared parameters);
* the shared tensor is one parameter used by several blocks; DDP reduces its summed gradient once;
* with **reentrant** activation checkpointing (``set_grad_checkpointing`` + ``use_reentrant=True``)
  each checkpointed block's backward marks the shared weight ready again, and DDP fails with
  "Expected to mark a variable ready only once": pass ``static_graph=True``. Non-reentrant
  checkpointing needs nothing special;
* a static graph does not support ``ddp.no_sync()``: to accumulate gradients under it, let every
  micro-batch synchronise (one all-reduce each, the same gradient).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import timm
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import sharify
from sharify.train import load_data
from sharify.train.loaders import TransformedDataset, build_transforms


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root")
    p.add_argument("--subset", type=int)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grad-checkpointing", choices=("off", "reentrant", "non-reentrant"), default="off")
    p.add_argument("--out", default="ddp_model.pt")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")  # reads torchrun's RANK/WORLD_SIZE/MASTER_*
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)

    data = load_data(args.data, root=args.data_root, subset=args.subset)
    size = (data.image_size or (224, 224))[0]
    model = timm.create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans)
    model = sharify.sharify(model, example_inputs=torch.zeros(1, data.in_chans, size, size)).to(device)
    reentrant = args.grad_checkpointing == "reentrant"
    if args.grad_checkpointing != "off":
        timm.layers.set_reentrant_ckpt(reentrant)
        model.set_grad_checkpointing(True)
    ddp = DDP(model, device_ids=[device.index] if cuda else None, static_graph=reentrant)

    train_tf, _, _ = build_transforms(data, model)
    train_set = TransformedDataset(data.train, train_tf)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, pin_memory=cuda, drop_last=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        total = torch.zeros(2, device=device)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = loss_fn(ddp(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach() * len(labels), torch.tensor(float(len(labels)), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(
                f"epoch {epoch}: mean train loss {total[0] / total[1]:.4f} over {int(total[1])} images, "
                f"{world} processes"
            )
    # Every rank holds the same shared tensor; rank 0 saves.
    holder, _members = next(iter(sharify.shared_groups(model).values()))
    weight = holder.weight.detach()
    copies = [torch.empty_like(weight) for _ in range(world)]
    dist.all_gather(copies, weight)
    same = all(torch.equal(c, weight) for c in copies)
    if rank == 0:
        torch.save(model.state_dict(), args.out)
        print(f"shared tensor identical on all ranks: {same}")
    if created:
        dist.destroy_process_group()
    return {"loss": float(total[0] / total[1]), "same_on_ranks": float(same)}


if __name__ == "__main__":
    main()
