"""Run by test_finetune_ddp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

1. Fine-tunes a sharified GroupNorm TinyNet with :func:`sharify.train.finetune` and saves each
   rank's final state_dict (``rank<r>.safetensors``).
2. DDP + reentrant activation checkpointing of a sharified timm model: one backward with
   ``static_graph=False`` and one with ``static_graph=True``; the outcomes go to ``ckpt.json``.
3. Runs ``examples/ddp_torchrun.py`` with reentrant checkpointing.
4. Runs the command line, ``sharify.cli.main(["finetune", ...])`` as ``torchrun -m sharify finetune``
   does, with ``--grad-checkpointing`` (still reentrant); each rank gets its own ``--out``, so a file
   written by rank 1 would show. Exit codes and checkpoint counts go to ``cli.json``.

One torchrun launch for all four: starting processes is the slow part on a small CPU machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import pytest
from finetune_utils import TinyNet, shrink_timm_resnets

import sharify
from sharify.train import finetune, load_data


def grad_checkpointing(out: Path) -> None:
    import timm
    from timm.layers import set_reentrant_ckpt
    from torch.nn.parallel import DistributedDataParallel as DDP

    set_reentrant_ckpt(True)
    torch.manual_seed(0)
    model = sharify.sharify(
        timm.create_model("resnet18", num_classes=3, channels=(8, 16, 32, 64)), example_inputs=torch.zeros(1, 3, 32, 32)
    )
    model.set_grad_checkpointing(True)
    results = {}
    for static in (False, True):
        model.zero_grad()
        ddp = DDP(model, static_graph=static)
        try:
            for _ in range(2):  # static_graph records the graph on the first iteration
                ddp(torch.randn(2, 3, 32, 32)).sum().backward()
            grad = model.sharify_shared.layer1.conv2.weight.grad
            grads = [torch.zeros_like(grad) for _ in range(dist.get_world_size())]
            dist.all_gather(grads, grad)
            results[str(static)] = {"ok": True, "same_grad_on_ranks": all(torch.equal(g, grads[0]) for g in grads)}
        except RuntimeError as exc:
            results[str(static)] = {"ok": False, "error": str(exc).splitlines()[0]}
    if dist.get_rank() == 0:
        (out / "ckpt.json").write_text(json.dumps(results))


def command_line(data_dir: Path, out: Path) -> None:
    import torch.utils.checkpoint

    from sharify.cli import main as sharify_main

    real = torch.utils.checkpoint.checkpoint
    calls = []

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    rank = dist.get_rank()
    argv = ["finetune", "--model", "timm:resnet18", "--data", str(data_dir), "--out", str(out / f"cli-rank{rank}")]
    argv += ["--epochs", "1", "--batch-size", "4", "--subset", "16", "--workers", "0", "--device", "cpu"]
    with pytest.MonkeyPatch.context() as mp:
        shrink_timm_resnets(mp)
        mp.setattr(torch.utils.checkpoint, "checkpoint", counting)
        code = sharify_main([*argv, "--grad-checkpointing", "--quiet"])
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, {"rc": code, "checkpoint_calls": len(calls)})
    if rank == 0:
        (out / "cli.json").write_text(json.dumps(results))


def main() -> None:
    data_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")  # once: finetune() and the example use the existing group
    torch.manual_seed(0)
    shared = sharify.sharify(TinyNet(norm="gn"), example_inputs=torch.zeros(1, 3, 12, 12))
    result = finetune(
        shared,
        load_data(data_dir),
        out=out / "run",
        epochs=1,
        batch_size=4,
        workers=0,
        lr=0.1,
        augment=False,
        quiet=True,
        device="cpu",
    )
    rank = dist.get_rank()
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    grad_checkpointing(out)

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import ddp_torchrun

    result = ddp_torchrun.main(
        [
            "--data",
            str(data_dir),
            "--subset",
            "16",
            "--batch-size",
            "4",
            "--grad-checkpointing",
            "reentrant",
            "--out",
            str(out / "example.pt"),
        ]
    )
    if rank == 0:
        (out / "example.json").write_text(json.dumps(result))
    command_line(data_dir, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
