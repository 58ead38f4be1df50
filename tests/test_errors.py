"""One exception family: every exception sharify exports derives from ``SharifyError`` or is a standard one."""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import sharify
import sharify.analysis.shapes
import sharify.errors
import sharify.train
import sharify.train.errors

# Exceptions sharify exports that are not SharifyErrors, each with its reason: none today.
STANDARD: dict[type[BaseException], str] = {}


def _exported_exceptions(module: ModuleType) -> list[type[BaseException]]:
    found = [getattr(module, name) for name in module.__all__]
    return [x for x in found if inspect.isclass(x) and issubclass(x, BaseException)]


@pytest.mark.parametrize("module", [sharify, sharify.train, sharify.errors], ids=lambda m: m.__name__)
def test_every_exported_exception_is_a_sharify_error(module: ModuleType) -> None:
    exported = _exported_exceptions(module)
    assert exported, f"{module.__name__} exports no exception"
    for cls in exported:
        assert issubclass(cls, sharify.SharifyError) or cls in STANDARD, cls
        home = cls.__module__ if cls.__module__ != "sharify.train.errors" else cls.__mro__[1].__module__
        assert home == "sharify.errors", f"{cls.__name__} is neither in sharify/errors.py nor a subclass of one there"


def test_one_except_catches_training_and_library_checkpoint_errors() -> None:
    assert issubclass(sharify.train.CheckpointError, sharify.CheckpointError)
    with pytest.raises(sharify.CheckpointError, match="corrupt"):
        raise sharify.train.CheckpointError("checkpoint x is corrupt")


def test_example_inputs_error_is_importable_from_its_old_home() -> None:
    assert sharify.analysis.shapes.ExampleInputsError is sharify.errors.ExampleInputsError is sharify.ExampleInputsError


def test_the_standard_bases_callers_catch_are_kept() -> None:
    # `except ValueError` / `except TypeError` / `except OSError` in callers' code keeps working
    assert issubclass(sharify.CheckpointError, ValueError)
    assert issubclass(sharify.RecipeMismatchError, sharify.CheckpointError)
    assert issubclass(sharify.ExampleInputsError, ValueError)
    assert issubclass(sharify.UnsupportedModelError, TypeError)
    assert issubclass(sharify.PretrainedWeightsError, OSError)
    assert issubclass(sharify.train.DataError, sharify.SharifyError)
