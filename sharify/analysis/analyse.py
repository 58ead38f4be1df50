"""One model's analysis: its trace, the shapes of its nodes, its residual blocks and stages.

:func:`analyse` runs the analysis passes in order -- :func:`~sharify.analysis.tracing.trace`,
:func:`~sharify.analysis.shapes.propagate_shapes` (up to the last node that can be a residual addition),
:func:`~sharify.analysis.residual.find_stages` -- and returns their results as one :class:`Analysis`, which
:mod:`sharify.planning` turns into a plan. Nothing is modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from .residual import Block, Stage, find_stages, last_candidate_add
from .shapes import Propagation, default_input_shapes, propagate_shapes
from .tracing import LeafSpec, TraceResult, trace

__all__ = ["Analysis", "analyse"]


@dataclass(frozen=True)
class Analysis:
    """What the analysis passes found in one model (read-only).

    Attributes:
        model: The analysed model.
        graph: Its torch.fx graph; the nodes up to the last residual addition carry ``meta["val"]``.
        blocks: Its residual blocks, in execution order.
        stages: Its stages (consecutive blocks of one output shape, one-block stages included).
        trace: The trace's result: submodules leafed automatically, where the root's forward stopped.
        shapes: The inputs shapes were propagated with, and where propagation stopped.
    """

    model: nn.Module
    graph: fx.Graph
    blocks: tuple[Block, ...]
    stages: tuple[Stage, ...]
    trace: TraceResult
    shapes: Propagation


def analyse(
    model: nn.Module, example_inputs: Sequence[Tensor] | None = None, leaf_modules: LeafSpec | None = None
) -> Analysis:
    """Traces ``model``, propagates shapes and finds its residual blocks and stages.

    Args:
        model: The model (not modified).
        example_inputs: Its inputs, or ``None`` for a default image batch
            (:func:`~sharify.analysis.shapes.default_input_shapes`).
        leaf_modules: Module classes or paths torch.fx must not trace into.

    Raises:
        UntraceableError: The model cannot be traced where its stages are.
        ExampleInputsError: ``example_inputs`` do not fit the model, or no conv got a shape.
    """
    num_inputs = len(example_inputs) if example_inputs is not None else 1
    values = lambda: _value_inputs(model, example_inputs)  # noqa: E731
    traced = trace(model, leaf_modules, num_inputs=num_inputs, example_inputs=values)
    # Shapes are needed up to the last possible residual add (in a transformer: none past the inputs).
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    needed = last_candidate_add(traced.graph, model) or (placeholders[-1] if placeholders else None)
    shapes = propagate_shapes(model, traced.graph, example_inputs, stop_after=needed)
    blocks, stages = find_stages(traced.graph, model)
    return Analysis(model, traced.graph, tuple(blocks), tuple(stages), traced, shapes)


def _value_inputs(model: nn.Module, example_inputs: Sequence[Tensor] | None) -> Sequence[Tensor]:
    """The inputs the trace computes values on where Python control flow needs one (see
    :func:`~sharify.analysis.tracing.trace`): the example inputs, else the first default input, on the model's
    device."""
    if example_inputs is not None:
        return example_inputs
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.get_default_dtype())
    return (torch.empty(default_input_shapes(model, None)[0], device=device, dtype=dtype),)
