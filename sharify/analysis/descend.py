"""Analysing the submodules of a model whose own forward torch.fx cannot trace (detectors, optical flow).

A detector's forward takes a list of images, checks their sizes and loops over proposals: torch.fx cannot
trace it, but its ``backbone`` traces. When the root's own forward stops the trace before anything
shareable, :func:`plan_parts` analyses the largest submodules that do trace, each on its own:

1. The root is run once on fake tensors (its example inputs, else ``(1, C, 224, 224)`` with ``C`` the
   first conv's input channels), and the tensor arguments of the first call of every submodule are
   recorded; the run may stop anywhere (a data-dependent size, NMS), what it recorded until then is kept.
2. Each child holding convs is analysed as a model of its own, with its recorded inputs or, where the run
   did not reach it with tensors only, its own default inputs (:func:`sharify.analysis.shapes.default_input_shapes`).
   A child that cannot be analysed either is searched the same way, down to the convs.
3. The parts' stages and groups, with their paths made relative to the root, form the root's plan, so
   the store of shared tensors stays on the root. :attr:`SharingPlan.submodules` says which submodules
   were analysed and which were not, and why.

The analysis is deterministic given the root's example inputs, so :func:`sharify.load` repeats it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import SharifyError, UntraceableError
from .residual import Block, Stage
from .tracing import LeafSpec, attributes_restored, eval_mode

__all__ = [
    "plan_parts",
    "join_path",
    "prefixed_stage",
    "record_calls",
    "root_default_input",
    "short_reason",
    "sub_leaf_modules",
]

logger = logging.getLogger(__name__)

#: ``analyse(path, module, example_inputs, leaf_modules)``: the plan of one submodule (no descent of its own).
Analyse = Callable[[str, nn.Module, "tuple[Tensor, ...] | None", "LeafSpec | None"], Any]
T = TypeVar("T")


def _holds_conv(module: nn.Module) -> bool:
    """Whether ``module`` holds a layer sharify can share (a conv, or a Linear of a transformer block)."""
    return any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


def root_default_input(model: nn.Module) -> tuple[Tensor, ...]:
    """One ``(1, C, 224, 224)`` image per required positional input of the forward (two for optical flow)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    try:
        params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    count = sum(1 for p in params if p.kind in positional and p.default is p.empty)
    image = torch.zeros(1, conv.in_channels if conv is not None else 3, 224, 224, dtype=dtype)
    return (image,) * max(count, 1)


def short_reason(reason: str) -> str:
    """The first sentence of an error message (torch.fx's run on for a paragraph)."""
    head = re.split(r"\.\s+(?=[A-Z])", reason, maxsplit=1)[0]
    return head + ")" * max(0, head.count("(") - head.count(")"))


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)

#: The recorded call of a submodule: ``(shape, dtype)`` of each positional argument.
Call = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def record_calls(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, Call]:
    """Runs ``model`` (eval mode, no grad) on fake tensors and records each conv-holding submodule's first call.

    Only calls whose arguments are all tensors (no keyword arguments) are recorded, as ``(shape, dtype)``
    per argument. The run stops at the first operation fake tensors cannot run. The model's own hooks do not
    run, and the model is not changed (attributes the forward sets on its modules are restored).
    """
    paths = {
        id(m): p for p, m in model.named_modules() if p and not isinstance(m, (nn.Conv2d, nn.Linear)) and _holds_conv(m)
    }
    seen: dict[str, Call] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        path = paths.get(id(module))
        if path is not None and path not in seen and args and not kwargs and all(isinstance(a, Tensor) for a in args):
            seen[path] = tuple((tuple(a.shape), a.dtype) for a in args)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        for context in (attributes_restored(model), eval_mode(model), torch.no_grad(), warnings.catch_warnings()):
            stack.enter_context(context)
        stack.enter_context(_quiet("torch._subclasses.fake_tensor"))
        warnings.simplefilter("ignore")  # torch's and the model's remarks on a run that is only recorded
        for module in model.modules():  # the user's hooks do not see this run (the originals come back on exit)
            module.__dict__.update({name: OrderedDict() for name in _HOOKS if name in module.__dict__})
        for module in model.modules():
            if id(module) in paths:
                module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with mode:
                model(*(mode.from_tensor(x).to(device) for x in inputs))
        except Exception as exc:  # the run is expected to stop somewhere (NMS, a size check on data)
            logger.debug("the recorded call of %s stopped: %s", type(model).__name__, exc)
    return seen


def sub_leaf_modules(leaf_modules: LeafSpec | None, path: str) -> list[type[nn.Module] | str] | None:
    """``leaf_modules`` (classes and root-relative paths) as seen from the submodule at ``path``."""
    if leaf_modules is None:
        return None
    out: list[type[nn.Module] | str] = []
    for x in leaf_modules:
        if isinstance(x, type):
            out.append(x)
        elif x.startswith(path + "."):
            out.append(x[len(path) + 1 :])
    return out


def join_path(path: str, inner: str) -> str:
    return f"{path}.{inner}" if inner else path


def prefixed_stage(stage: Stage, path: str) -> Stage:
    def block(b: Block) -> Block:
        return dataclasses.replace(
            b,
            add=f"{path}.{b.add}",
            path=join_path(path, b.path),
            convs=tuple(join_path(path, c) for c in b.convs),
            shortcut_convs=tuple(join_path(path, c) for c in b.shortcut_convs),
        )

    return dataclasses.replace(stage, path=join_path(path, stage.path), blocks=tuple(block(b) for b in stage.blocks))


def _shapes(inputs: tuple[Any, ...]) -> str:
    return ", ".join(str(tuple(s)) for s, _ in inputs)


def plan_parts(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    leaf_modules: LeafSpec | None,
    root_error: UntraceableError,
    analyse: Analyse,
) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """Analyses the largest conv-holding submodules of ``model`` that ``analyse`` can handle.

    Args:
        model: The model whose own forward cannot be traced.
        inputs: The root's example inputs (or :func:`root_default_input`).
        leaf_modules: The root's ``leaf_modules``.
        root_error: Why the root's forward cannot be traced.
        analyse: Plans one submodule (it raises for a submodule that cannot be analysed either).

    Returns:
        The analysed parts as ``(path, plan)``, and for every submodule tried, whether it was analysed
        (``"analysed with inputs ..."``) or not (``"not analysed: <why>"``).

    Raises:
        UntraceableError: No submodule could be analysed, or none has anything to share; the message names
            what was tried and what to do.
    """
    recorded = record_calls(model, inputs)
    parts: list[tuple[str, Any]] = []
    status: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if isinstance(child, (nn.Conv2d, nn.Linear)) or not _holds_conv(child):
                continue
            calls = recorded.get(path)
            example = tuple(torch.zeros(s, dtype=d) for s, d in calls) if calls else None
            try:
                part = analyse(path, child, example, sub_leaf_modules(leaf_modules, path))
            except SharifyError as exc:  # untraceable itself, or its inputs unknown: try its children
                reason = getattr(exc, "reason", None)
                why = (
                    f"torch.fx cannot trace its forward ({short_reason(reason)})" if reason else short_reason(str(exc))
                )
                status[path] = f"not analysed: {why}"
                visit(child, path + ".")
                continue
            if not part.groups and part.auto_leaves:  # its convs are in children it could not trace: try those
                leaves = ", ".join(f"`{join_path(path, p)}`" for p in part.auto_leaves)
                status[path] = f"not analysed: its own forward traces, but not its submodules {leaves}"
                visit(child, path + ".")
                continue
            where = (
                f"inputs {_shapes(calls)} recorded from the forward of {type(model).__name__}"
                if calls
                else (f"its default inputs {', '.join(str(tuple(s)) for s in part.input_shapes)}")
            )
            n = len(part.groups)
            found = f"{n} group{'s' * (n != 1)}" if n else "nothing to share"
            status[path] = f"analysed with {where}: {found}"
            parts.append((path, part))

    visit(model, "")
    if not any(part.groups for _, part in parts):
        raise _nothing_found(model, root_error, parts, status)
    return parts, status


def _nothing_found(
    model: nn.Module, root_error: UntraceableError, parts: list[tuple[str, Any]], status: dict[str, str]
) -> UntraceableError:
    """The refusal for a root whose submodules, analysed in its place, hold nothing to share."""
    plans = dict(parts)
    tried = "; ".join(
        f"`{p}` {s}" + (f" ({plans[p].empty_reason().split(';')[0]})" if p in plans else "") for p, s in status.items()
    )
    reason = getattr(root_error, "reason", str(root_error))
    error = UntraceableError(
        f"torch.fx cannot trace `{type(model).__name__}.forward` ({short_reason(reason)}), and none of its "
        f"submodules analysed in its place has anything to share "
        f"({tried or 'no submodule holds convs or Linear layers'}). sharify "
        "needs the data flow of the residual stages: share a submodule that torch.fx can trace and that holds "
        "residual blocks (sharify.sharify(model.<name>, inplace=True)), or pass example_inputs= matching the "
        "forward's arguments"
    )
    error.module_path = ""  # type: ignore[attr-defined]
    error.reason = reason  # type: ignore[attr-defined]
    return error
