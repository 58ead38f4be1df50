"""Run by test_finetune_ddp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

1. Fine-tunes a sharified GroupNorm TinyNet with :func:`sharify.train.finetune` and saves each
   rank's final state_dict (``rank<r>.safetensors``).
2. DDP + reentrant activation checkpointing of a sharified timm model: one backward with
   ``static_graph=False`` and one with ``static_graph=True``; the outcomes go to ``ckpt.json``.
3. Gradient accumulation (2 micro-batches per update) under ``DDP(static_graph=True)`` with the
   :class:`~sharify.train.loop.Trainer`, compared with one process on the global batch (``accum.json``).
4. Runs ``examples/ddp_torchrun.py`` with reentrant checkpointing.
5. Runs the command line, ``sharify.cli.main(["finetune", ...])`` as ``torchrun -m sharify finetune``
   does, with ``--grad-checkpointing`` (still reentrant), ``--accum-steps 2`` and ``--ema`` on a
   BatchNorm net; each rank gets its own ``--out``, so a file written by rank 1 would show. Exit
   codes, checkpoint counts, DDP's ``static_graph`` and the state_dict keys (BN buffers, EMA) that
   differ from rank 0's go to ``cli.json``.

One torchrun launch for all five: starting processes is the slow part on a small CPU machine.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import pytest
from finetune_utils import TinyNet, shrink_timm_resnets

import sharify
from sharify.train import FinetuneConfig, finetune, load_data
from sharify.train.distributed import DistContext
from sharify.train.loop import Trainer


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


def _sgd_trainer(model: nn.Module, wrapped: nn.Module, ctx: DistContext, accum_steps: int) -> Trainer:
    return Trainer(
        model=wrapped,
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        scheduler=None,
        ctx=ctx,
        config=FinetuneConfig(accum_steps=accum_steps, quiet=True),
    )


def accumulation_under_static_graph(out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    start = sharify.sharify(TinyNet(norm="gn"), example_inputs=torch.zeros(1, 3, 12, 12))
    g = torch.Generator().manual_seed(1)  # every rank draws all ranks' micro-batches: 2 updates of 2 each
    batches = [
        [(torch.randn(2, 3, 12, 12, generator=g), torch.randint(0, 3, (2,), generator=g)) for _ in range(4)]
        for _ in range(world)
    ]
    model = copy.deepcopy(start)
    try:
        _sgd_trainer(model, DDP(model, static_graph=True), DistContext(rank, world), 2).train_epoch(batches[rank], 1, 1)
        outcome: dict[str, object] = {"ok": True}
    except RuntimeError as exc:
        outcome = {"ok": False, "error": str(exc).splitlines()[0]}
    # the same two updates in one process, each on the global batch (all ranks' micro-batches of the update)
    reference, merged = copy.deepcopy(start), []
    for u in (0, 2):
        group = [micro for own in batches for micro in own[u : u + 2]]
        merged.append((torch.cat([x for x, _ in group]), torch.cat([y for _, y in group])))
    _sgd_trainer(reference, reference, DistContext(), 1).train_epoch(merged, 1, 1)
    if outcome["ok"]:
        a, b = model.state_dict(), reference.state_dict()
        outcome["max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        key = "sharify_shared.layer1.conv2.weight"
        outcome["moved"] = float((b[key] - start.state_dict()[key]).abs().max())
    results: list[object] = [None] * world
    dist.all_gather_object(results, outcome)
    if rank == 0:
        (out / "accum.json").write_text(json.dumps(results))


def command_line(data_dir: Path, out: Path) -> None:
    import torch.utils.checkpoint

    from sharify.cli import main as sharify_main

    real = torch.utils.checkpoint.checkpoint
    calls = []

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    static_graphs: list[bool] = []

    class RecordingDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            static_graphs.append(self.static_graph)

    rank = dist.get_rank()
    argv = ["finetune", "--model", "timm:resnet18", "--data", str(data_dir), "--out", str(out / f"cli-rank{rank}")]
    argv += ["--epochs", "1", "--batch-size", "4", "--subset", "16", "--workers", "0", "--device", "cpu"]
    argv += ["--grad-checkpointing", "--accum-steps", "2", "--ema", "0.5", "--quiet"]  # per rank: 2 micro-batches
    finetune_module = importlib.import_module("sharify.train.finetune")
    results_of: list[Any] = []

    def keeping(*args: Any, **kwargs: Any) -> Any:
        results_of.append(real_finetune(*args, **kwargs))
        return results_of[-1]

    real_finetune = finetune_module.finetune
    with pytest.MonkeyPatch.context() as mp:
        shrink_timm_resnets(mp)
        mp.setattr(torch.utils.checkpoint, "checkpoint", counting)
        mp.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
        mp.setattr(finetune_module, "finetune", keeping)
        code = sharify_main(argv)
    # the trained model and its EMA copy (BatchNorm buffers included) must be rank 0's on every rank
    states = {"model": results_of[0].model.state_dict(), "ema": results_of[0].ema_model.state_dict()}
    ranks_states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks_states, states)
    differ = {
        name: [k for k, v in state.items() if not torch.equal(v, ranks_states[0][name][k])]
        for name, state in states.items()
    }
    outcome = {"rc": code, "checkpoint_calls": len(calls), "static_graph": static_graphs, "differ": differ}
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, outcome)
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
    accumulation_under_static_graph(out)

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
