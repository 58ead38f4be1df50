"""Data-parallel fine-tuning: 2 gloo processes under torchrun equal one process on the same global batch;
the command line under torchrun writes its outputs from rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sharify
from sharify.train import finetune, latest_checkpoint, load_data
from sharify.train.distributed import DistContext
from sharify.train.loaders import build_loaders
from sharify.train.loop import evaluate
from tests.conftest import ROOT
from tests.fake_data import make_image_folder
from tests.nets import TinyNet
from tests.train.finetune_utils import DDP_COMPARISON


def _env() -> dict[str, str]:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_image_folder(tmp / "data", classes=3, train=8, val=4)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "train" / "ddp_worker.py"),
        str(data),
        str(tmp),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, tmp


def test_two_processes_equal_one_process_on_the_global_batch(ddp_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = ddp_run
    torch.manual_seed(0)
    shared = sharify.sharify(TinyNet(norm="gn"), example_inputs=torch.zeros(1, 3, 12, 12))
    initial = {k: v.clone() for k, v in shared.state_dict().items()}
    # 24 images: one process with batches of 8 sees the same 3 global batches as 2 ranks with 4 each.
    single = finetune(shared, load_data(data), out=tmp_path, batch_size=8, **DDP_COMPARISON).model.state_dict()
    rank0, rank1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    written = load_file(str(out / "run" / "model.safetensors"))
    assert set(rank0) == set(single) == set(written)
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
        assert torch.equal(written[key], rank0[key])
    moved = single["sharify_shared.layer1.conv2.weight"] - initial["sharify_shared.layer1.conv2.weight"]
    assert moved.abs().max() > 1e-3  # training did change the shared tensor
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_images"] == 12 and metrics[-1]["train_images"] == 24  # reduced over both ranks


def test_ddp_reentrant_checkpointing_needs_static_graph(ddp_run: tuple[Path, Path]) -> None:
    results = json.loads((ddp_run[1] / "ckpt.json").read_text())
    # The shared weight is used inside several checkpointed blocks: each re-entrant backward marks it ready again.
    assert not results["False"]["ok"] and "mark a variable ready only once" in results["False"]["error"]
    assert results["True"] == {"ok": True, "same_grad_on_ranks": True}


def test_accumulation_under_a_static_graph_equals_one_process_on_the_global_batch(ddp_run: tuple[Path, Path]) -> None:
    ranks = json.loads((ddp_run[1] / "accum.json").read_text())
    # DDP(static_graph=True) + no_sync() fails (pytorch/pytorch#143580): the Trainer reduces every micro-batch
    assert [r["ok"] for r in ranks] == [True, True], ranks
    assert all(r["max_diff"] < 1e-5 and r["moved"] > 1e-3 for r in ranks), ranks


def test_ddp_static_graph_only_for_reentrant_checkpointing() -> None:
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    from sharify.train.distributed import ddp_static_graph

    previous = use_reentrant_ckpt()
    try:
        set_reentrant_ckpt(True)
        assert ddp_static_graph(True) and not ddp_static_graph(False)
        set_reentrant_ckpt(False)  # timm's default: DDP needs nothing special
        assert not ddp_static_graph(True)
    finally:
        set_reentrant_ckpt(previous)


def test_ddp_example_runs_with_reentrant_checkpointing(ddp_run: tuple[Path, Path]) -> None:
    result = json.loads((ddp_run[1] / "example.json").read_text())
    assert result["same_on_ranks"] == 1.0 and result["loss"] > 0
    state = torch.load(ddp_run[1] / "example.pt", weights_only=True)
    assert any(k.startswith("sharify_shared.") for k in state)


def test_command_line_under_torchrun_writes_only_from_rank_0(ddp_run: tuple[Path, Path]) -> None:
    out = ddp_run[1]
    ranks = json.loads((out / "cli.json").read_text())
    assert [r["rc"] for r in ranks] == [0, 0]
    assert all(r["checkpoint_calls"] > 0 for r in ranks)  # --grad-checkpointing ran ...
    assert all(r["static_graph"] == [True] for r in ranks)  # ... reentrant: static graph, with --accum-steps 2
    # a BatchNorm net with EMA: all ranks end with rank 0's buffers and EMA; the metrics are the saved model's
    assert [r["differ"] for r in ranks] == [{"model": [], "ema": []}] * 2, ranks
    assert not (out / "cli-rank1").exists()  # rank 1 wrote nothing
    run = out / "cli-rank0"
    assert {p.name for p in run.iterdir()} == {
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "model.safetensors",
        "model_ema.safetensors",
        "report.json",
        "report.md",
    }
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["train_images"] == 16 and metrics[0]["val_images"] == 12  # both ranks
    # the metrics reduced over the two ranks' validation shards are those of the saved weights in one process
    data = load_data(ddp_run[0], subset=16)
    for weights, prefix in (("model.safetensors", ""), ("model_ema.safetensors", "ema_")):
        model = sharify.load(run / weights)
        val = build_loaders(data, model, DistContext(), batch_size=4, workers=0).val
        alone = evaluate(model, val, DistContext())
        assert alone["val_images"] == 12 and alone["top1"] == metrics[0][f"{prefix}top1"]
        assert alone["val_loss"] == pytest.approx(metrics[0][f"{prefix}val_loss"], rel=1e-5, abs=1e-6)
    assert latest_checkpoint(run) == run / "checkpoints" / "epoch-0001"
    assert json.loads((run / "config.json").read_text())["setup"]["world_size"] == 2
