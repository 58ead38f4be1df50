"""What sharing saves for storage/training vs what remains after conv-BN folding (deployment).

Usage: ``python -m benchmarks.folding > benchmarks/results/folding.md``

Random weights (parameter counts do not depend on them); the figures come from
``sharify.report`` (``params_after`` and ``params_after_folding``). The folding is ``sharify.fold_batchnorm``'s,
which keeps each shared tensor once (a folded member keeps a per-channel scale and bias), counted on the basis of
the unfolded original: the saving after folding is what the folded shared model saves against the original folded
with torch's usual fusion. Speed of the folded models and int8 file sizes: ``benchmarks/deploy_folding.py``.
"""

from __future__ import annotations

import torch

import sharify
from benchmarks.cifar_models import cifar_resnet, preact_resnet164, wide_resnet
from sharify.io.zoo import build_model

CIFAR = torch.randn(1, 3, 32, 32)

MODELS = [
    ("torchvision resnet34", lambda: build_model("tv:resnet34")[0], {}),
    ("torchvision resnet34, filter basis (dsfb-basis S48U1)", lambda: build_model("tv:resnet34")[0],
     {"preset": "dsfb-basis", "shared_rank": 48, "unique_rank": 1}),
    ("torchvision resnet50", lambda: build_model("tv:resnet50")[0], {}),
    ("timm resnetv2_50 (pre-activation bottleneck)", lambda: build_model("timm:resnetv2_50")[0], {}),
    ("CIFAR ResNet-20 (post-activation basic)", lambda: cifar_resnet(20), {"example_inputs": CIFAR}),
    ("CIFAR ResNet-164 (pre-activation bottleneck)", preact_resnet164, {"example_inputs": CIFAR}),
    ("CIFAR WRN-40-4 (pre-activation basic)", lambda: wide_resnet(40, 4),
     {"example_inputs": CIFAR, "skip_first_block": True}),
]  # fmt: skip


def main() -> None:
    print("| model | params | shared (storage, training) | after conv-BN folding (deployment) |")
    print("|---|---:|---:|---:|")
    for name, build, kwargs in MODELS:
        model = build()
        r = sharify.report(model, sharify.sharify(model, **kwargs))
        assert r.params_after_folding is not None and r.reduction_after_folding is not None
        print(
            f"| {name} | {r.params_before / 1e6:.2f} M | {r.params_after / 1e6:.2f} M ({-r.reduction:+.1%}) "
            f"| {r.params_after_folding / 1e6:.2f} M ({-r.reduction_after_folding:+.1%}) |"
        )


if __name__ == "__main__":
    main()
