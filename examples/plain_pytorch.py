"""Fine-tune a sharified torchvision ResNet with a plain PyTorch loop (no sharify.train machinery).

Integration points shown: (1) ``sharify.sharify(model)`` right after building the model, before the
optimizer; (2) original (unshared) weights loaded with ``sharify.load_unshared_state_dict``.
The sharified model is an ordinary ``nn.Module``: optimizer, loop and ``state_dict`` need no changes.

    python examples/plain_pytorch.py --data fashion-mnist --subset 512 --epochs 1
    python examples/plain_pytorch.py --data path/to/imagefolder --checkpoint resnet18_original.pth
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

import sharify
from sharify.train import load_data
from sharify.train.loaders import TransformedDataset


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", help="ImageFolder dir, fashion-mnist, cifar10, cifar100")
    p.add_argument("--data-root")
    p.add_argument("--subset", type=int, help="training/validation images to use")
    p.add_argument("--checkpoint", help="original (unshared) torchvision resnet18 state_dict (.pth)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the first image's, at most 224)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default="plain_model.safetensors")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    data = load_data(args.data, root=args.data_root, subset=args.subset)
    first = data.image_size or (224, 224)  # (H, W) of the first image
    side = args.image_size or min(*first, 224)
    to_rgb = [T.Grayscale(3)] if data.in_chans == 1 else []  # torchvision ResNets take 3 channels
    # Photos in an ImageFolder differ in size: scale the shorter side, then crop a square, so they batch.
    resize = [T.Resize(side), T.CenterCrop(side)]
    tail = [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    train_tf = T.Compose([*to_rgb, *resize, T.RandomHorizontalFlip(), *tail])
    val_tf = T.Compose([*to_rgb, *resize, *tail])
    train = DataLoader(TransformedDataset(data.train, train_tf), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TransformedDataset(data.val, val_tf), batch_size=2 * args.batch_size)

    # (1) build as usual, then sharify before creating the optimizer.
    model = torchvision.models.resnet18(num_classes=data.num_classes)
    shared = sharify.sharify(model, example_inputs=torch.zeros(1, 3, side, side))
    if args.checkpoint:  # (2) original weights fold into the shared tensors (members averaged)
        sharify.load_unshared_state_dict(shared, torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    print(sharify.report(model, shared))

    optimizer = torch.optim.SGD(shared.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        shared.train()
        tic, seen = time.perf_counter(), 0
        for images, labels in train:
            loss = loss_fn(shared(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(labels)
        shared.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val:
                correct += int((shared(images).argmax(1) == labels).sum())
                total += len(labels)
        top1 = 100.0 * correct / total
        print(
            f"epoch {epoch}: loss {loss.item():.4f}, top1 {top1:.2f}%, {seen / (time.perf_counter() - tic):.0f} img/s"
        )
    # Each shared tensor is stored once; the file loads into sharify.sharify(resnet18(...)) with load_state_dict.
    save_file({k: v.contiguous() for k, v in shared.state_dict().items()}, args.out)
    return {"top1": top1, "loss": loss.item()}


if __name__ == "__main__":
    main()
