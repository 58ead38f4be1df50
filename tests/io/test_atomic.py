"""The private helpers every writer and path check uses: the atomic writer, wrapper prefixes, module paths."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from torch import nn

from sharify._paths import module_paths, names_by_identity, within
from sharify._wrappers import strip_wrapper_prefixes
from sharify.io import atomic as _atomic
from sharify.train import checkpoint as train_checkpoint


def _fails(code: int, text: str):  # type: ignore[no-untyped-def]
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError(f"I/O error: {text} (os error {code}) at path {tmp}")  # safetensors' form

    return write


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    with pytest.raises(PermissionError, match=r"cannot write the file \(Permission denied\)") as info:
        _atomic.atomic_write(target, _fails(errno.EACCES, "Permission denied"))
    assert info.value.filename == str(target)  # the user's path, not the temporary file's
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.bin"]


def test_the_training_writer_names_the_path_in_its_message(tmp_path: Path) -> None:
    target = tmp_path / "new" / "report.json"
    with pytest.raises(
        OSError, match=r"cannot write .*report\.json \(No space left on device\); check free space"
    ) as info:
        train_checkpoint.atomic_write(target, _fails(errno.ENOSPC, "No space left on device"))
    assert info.value.errno == errno.ENOSPC and info.value.filename is None
    assert list(target.parent.iterdir()) == []


def test_an_error_that_is_not_an_io_failure_passes_unchanged(tmp_path: Path) -> None:
    def bad(tmp: Path) -> None:
        raise ValueError("Some tensors share memory")

    with pytest.raises(ValueError, match="share memory"):
        _atomic.atomic_write(tmp_path / "m.bin", bad)
    assert list(tmp_path.iterdir()) == []


def test_within_is_a_path_prefix_on_dots() -> None:
    assert within("layer1", "layer1") and within("layer1.0.conv1", "layer1") and within("fc", "")
    assert not within("layer10.conv", "layer1") and not within("layer1", "layer1.0")


def test_every_alias_of_a_module_and_a_tensor_is_found_first_path_first() -> None:
    conv = nn.Conv2d(1, 1, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    assert module_paths(model)[id(conv)] == ["0", "2"]
    assert names_by_identity(model.named_parameters(remove_duplicate=False))[id(conv.weight)] == [
        "0.weight",
        "2.weight",
    ]


def test_wrapper_prefixes_go_only_when_every_key_has_them() -> None:
    assert strip_wrapper_prefixes({"module._orig_mod.a": 1, "module._orig_mod.b": 2}) == {"a": 1, "b": 2}
    assert strip_wrapper_prefixes({"module.a": 1, "head.b": 2}) == {"module.a": 1, "head.b": 2}
