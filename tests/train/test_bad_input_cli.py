"""Bad input to ``sharify finetune`` / ``sharify report`` and to checkpoints: one clear line, never a wrong result."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sharify
import sharify.train.checkpoint as checkpoint_module
from sharify.cli import build_parser, main
from sharify.train import CheckpointError, DataError, FinetuneConfig, finetune, load_checkpoint, load_data
from tests.conftest import ROOT
from tests.fake_data import make_image_folder
from tests.nets import TinyNet
from tests.train.finetune_utils import EXAMPLE, cli_error, shrink_timm_resnets, tiny_shared

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, train=4, val=2)


def _base(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", "timm:resnet18", "--data", str(data_dir), "--out", str(out), "--workers", "0",
            "--batch-size", "4", "--quiet", *extra]  # fmt: skip


def _usage_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "error: " in err and "\n" not in err and "Traceback" not in err, err
    return err


def _config(out: Path, **kw: object) -> FinetuneConfig:
    base = {"out": out, "epochs": 2, "batch_size": 4, "workers": 0, "quiet": True, "device": "cpu", "augment": False}
    return FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]


# --- the same seed, the same model -----------------------------------------------------------------


def test_same_command_and_seed_give_bit_identical_weights(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shrink_timm_resnets(monkeypatch)
    files = []
    for run, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        torch.manual_seed(int(run, 16))  # whatever the global generator holds before, --seed decides
        assert main(_base(data_dir, tmp_path / run, "--seed", seed, "--subset", "6", "--init", "random")) == 0
        path = tmp_path / run / "model.safetensors"
        with safe_open(str(path), framework="pt") as f:  # safetensors writes the metadata map in any order
            files.append((f.metadata(), load_file(str(path))))
    (meta_a, a), (meta_b, b), (_, c) = files
    assert meta_a == meta_b  # the recipe, with a CRC-32 of every tensor
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert not torch.equal(a["fc.weight"], c["fc.weight"])  # and the seed matters


# --- checkpoints carry checksums -------------------------------------------------------------------


def _flip_last_tensor_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(raw))


def test_corrupt_checkpoint_is_refused_and_fallback_is_opt_in(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    finetune(tiny_shared(), data_dir, _config(out, keep_checkpoints=2))
    newest = out / "checkpoints" / "epoch-0002"
    _flip_last_tensor_byte(newest / "model.safetensors")

    model = tiny_shared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=re.escape(f"{newest / 'model.safetensors'} is corrupt: tensor `") + ".* checksum"
    ):
        load_checkpoint(newest, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded
    with pytest.raises(CheckpointError, match="pass --resume-fallback to resume from epoch-0001"):
        finetune(tiny_shared(), data_dir, _config(out, epochs=3, resume=True))

    with caplog.at_level(logging.WARNING, logger="sharify.train"):
        result = finetune(tiny_shared(), data_dir, _config(out, epochs=3, resume=True, resume_fallback=True))
    assert str(newest) in caplog.text
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]  # resumed after epoch 1, epochs 2 and 3 retrained


def test_corrupt_state_pt_is_refused(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    finetune(tiny_shared(), data_dir, _config(out, epochs=1))
    state_pt = out / "checkpoints" / "epoch-0001" / "state.pt"
    raw = bytearray(state_pt.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    state_pt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(f"{state_pt} is corrupt") + ".*no earlier checkpoint is left"):
        finetune(tiny_shared(), data_dir, _config(out, epochs=2, resume=True))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        finetune(tiny_shared(), data_dir, _config(out, epochs=2, resume=True, resume_fallback=True))


def test_resume_fallback_is_documented_and_needs_resume(data_dir: Path, tmp_path: Path) -> None:
    finetune_help = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()  # type: ignore[union-attr]
    assert "--resume-fallback" in finetune_help
    with pytest.raises(ValueError, match=r"--resume-fallback .* pass --resume"):
        finetune(tiny_shared(), data_dir, _config(tmp_path, resume_fallback=True))


# --- Ctrl-C ----------------------------------------------------------------------------------------


def test_interrupt_says_whether_there_is_anything_to_resume(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sharify.train.loop import Trainer

    shrink_timm_resnets(monkeypatch)
    real = Trainer.train_epoch
    calls = []

    def train_epoch(self: Trainer, *args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) in (1, 3):  # the first run's first epoch; the second run's second
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    args = _base(data_dir, tmp_path / "run", "--subset", "6", "--epochs", "2")
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert "nothing to resume" in err and "rerun" in err and "continue" not in err
    assert "holds no complete checkpoint" in cli_error([*args, "--resume"], capsys)

    assert main(args) == 130  # interrupted in epoch 2: epoch 1's checkpoint is there
    err = capsys.readouterr().err.strip()
    assert "epoch-0001" in err and "--resume" in err and "nothing to resume" not in err


# --- data ------------------------------------------------------------------------------------------


def test_one_class_image_folder_is_refused(tmp_path: Path) -> None:
    make_image_folder(tmp_path, classes=1, train=2, val=1)
    with pytest.raises(
        DataError, match=re.escape(f"{tmp_path / 'train'} holds 1 class folder (class0)") + ".*at least 2 classes"
    ):
        load_data(tmp_path)


# --- options that would do nothing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint-ema"], "--checkpoint-ema selects the EMA weights of a --checkpoint file"),
        (["--no-sharify", "--preset", "dsfb-shared"], "--preset configure sharing, which --no-sharify turns off"),
        (["--no-sharify", "--init", "first", "--positions", "first"], "--positions, --init configure sharing"),
        (["--data-root", "/tmp"], "--data-root is the directory of fashion-mnist/cifar files"),
        (["--pretrained", "--checkpoint", "w.pth"], "--pretrained and --checkpoint both give"),
        (["--resume-fallback"], "--resume-fallback chooses the checkpoint --resume continues from"),
        (["--epochs", "1", "--warmup-epochs", "2"], "--warmup-epochs 2.0 exceeds --epochs 1"),
        (["--min-lr", "1"], "--min-lr 1.0 exceeds --lr 0.05"),
        (["--sync-bn"], "--sync-bn"),
        (["--opt", "adamw", "--momentum", "0.8"], "--momentum has no effect with --opt adamw"),
    ],
)
def test_options_without_effect_are_refused(
    extra: list[str], message: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in cli_error(_base(data_dir, tmp_path / "o", *extra), capsys)
    assert not (tmp_path / "o").exists()


def test_in_chans_with_a_torchvision_model_is_refused(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*_base(data_dir, tmp_path / "o", "--in-chans", "1"), "--model", "resnet18"]
    assert "--in-chans applies to timm models" in cli_error(args, capsys)


def test_lambda_r_on_a_model_without_bases_is_refused(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--lambda-r 1\.0 weighs the orthogonality of filter bases"):
        finetune(tiny_shared(), data_dir, _config(tmp_path / "o", lambda_r=1.0))
    assert not (tmp_path / "o").exists()


# --- bad values: one line, status 2 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "tpu"], "unknown --device 'tpu'; use auto, cpu, cuda"),
        (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1), got 2.0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--momentum", "-1"], "--momentum must be >= 0"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
        (["--layer-decay", "2"], "--layer-decay must be in (0, 1]"),
        (["--clip-grad", "0"], "--clip-grad must be > 0"),
        (["--ema", "1"], "--ema must be a decay in (0, 1)"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
        (["--seed", str(10**23)], "--seed must be in [0, 2**32)"),
        (["--checkpoint", "/"], "checkpoint / is a directory; pass the weights file"),
        (["--opt", "bogus"], "--opt bogus: "),
    ],
)
def test_bad_finetune_values_give_one_line(
    extra: list[str],
    message: str,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shrink_timm_resnets(monkeypatch)
    assert message in cli_error(_base(data_dir, tmp_path / "o", *extra), capsys)


def test_momentum_is_left_at_the_default_when_not_given(data_dir: Path, tmp_path: Path) -> None:
    from sharify.train.cli import config_from_args

    parser = build_parser()
    args = parser.parse_args(_base(data_dir, tmp_path, "--opt", "adamw"))
    assert config_from_args(args).momentum == FinetuneConfig().momentum == 0.9
    assert config_from_args(parser.parse_args(_base(data_dir, tmp_path, "--momentum", "0.5"))).momentum == 0.5


def test_non_finite_outputs_are_an_error_not_an_accuracy(data_dir: Path, tmp_path: Path) -> None:
    model = tiny_shared()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))  # type: ignore[union-attr, operator]
    with pytest.raises(FloatingPointError, match="validation loss is nan"):
        finetune(model, data_dir, _config(tmp_path, eval_before=True))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "resnet18", "--num-classes", "-5"], "--num-classes: must be a positive integer, got -5"),
        (["report", "resnet18", "--num-classes", "0"], "--num-classes: must be a positive integer, got 0"),
        (["report", "resnet18", "--input-size", "-3", "32", "32"], "--input-size: must be a positive integer"),
        (["report", "resnet18", "--shared-rank", "x"], "--shared-rank: invalid positive integer value: 'x'"),
        (["finetune", "--model", "m", "--data", "d", "--lr", "nan"], "--lr: must be a finite number, got nan"),
        (["finetune", "--model", "m", "--data", "d", "--subset", "0"], "--subset: must be a positive integer"),
        (["finetune", "--model", "m", "--data", "d", "--image-size", "-1"], "--image-size: must be a positive"),
        (["finetune", "--model", "m", "--data", "d", "--amp", "fp8"], "--amp: invalid choice: 'fp8'"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error(args, capsys)
    assert message in err and "--help" in err


def test_cli_suggests_its_own_flags_not_python(capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error(["report", "resnet18", "--input-size", "1", "32", "32"], capsys)
    assert "--input-size 3 224 224" in err and "torch.randn" not in err and "example_inputs" not in err


# --- a failing disk: one line, status 1, no partial file ------------------------------------------


def test_stdout_on_a_full_disk_is_one_line_with_status_1() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(os.devnull if not Path("/dev/full").exists() else "/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "sharify", "report", "resnet18", "--json"], cwd=ROOT, env=env,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "sharify: error: cannot write the output to stdout (No space left on device)"


def test_out_on_a_full_disk_is_one_line_and_leaves_no_partial_file(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shrink_timm_resnets(monkeypatch)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.os, "fsync", full)
    out = tmp_path / "o"
    err = cli_error(_base(data_dir, out, "--subset", "6"), capsys, status=1)
    assert f"cannot write {out / 'config.json'} (No space left on device)" in err
    assert [p.name for p in out.iterdir()] == []  # the temporary file is gone, no half-written config.json


def test_bn_recalibrate_beyond_the_data_says_so(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sharify.train"):
        finetune(tiny_shared(), data_dir, _config(tmp_path, epochs=1, bn_recalibrate=1000))
    assert "--bn-recalibrate 1000: the data has 12 training images" in caplog.text


def test_checkpoint_on_a_full_disk_names_it_and_leaves_nothing_half_written(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def save_file(*args: object, **kwargs: object) -> None:  # what safetensors raises when the disk is full
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    epoch_dir = tmp_path / "checkpoints" / "epoch-0001"
    with pytest.raises(OSError, match=re.escape(f"cannot write {epoch_dir} (Error while serializing")):
        finetune(tiny_shared(), data_dir, _config(tmp_path, epochs=1))
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no epoch-0001, no .tmp-* directory


def test_library_warnings_are_one_line_in_cli_terms(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import warnings

    import sharify.cli as cli_module
    from sharify.io.zoo import ModelSource

    def share(model: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        warnings.warn("shape propagation stopped at `x`: stages there were not analysed; pass example_inputs the\n"
                      "whole model accepts", UserWarning, stacklevel=2)  # fmt: skip
        return sharify.sharify(model, example_inputs=EXAMPLE)

    monkeypatch.setattr(cli_module, "build_model", lambda *a, **k: (TinyNet(), ModelSource("torchvision", "tiny")))
    monkeypatch.setattr(cli_module, "sharify", share)
    shown = warnings.showwarning
    assert main(["report", "tiny", "--json"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (
        "sharify: warning: shape propagation stopped at `x`: stages there were not analysed; pass --input-size C H W "
        "the whole model accepts"
    )
    assert warnings.showwarning is shown  # restored after the command
