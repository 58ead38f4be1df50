"""Shape propagation over a traced graph with fake tensors: no real activation is allocated.

Every tensor-valued node gets ``node.meta["val"]``, a fake tensor carrying shape, dtype and device.
Parameters stay where they are (real, or on the meta device for models built there); fake tensor mode
wraps them without copying, so analysis memory does not grow with the model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import ExampleInputsError
from .tracing import attributes_restored, eval_mode, module_path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Silence torch's ERROR-level traceback for an op that fails under fake tensors: such a failure is
    expected while candidate inputs are tried, and it is recorded (``Propagation.failure``) and reported."""
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        fake_log.setLevel(level)


__all__ = [
    "ExampleInputsError",
    "Propagation",
    "as_inputs",
    "default_input_shapes",
    "patch_embed_size",
    "propagate_shapes",
]


def _first_conv(model: nn.Module, graph: fx.Graph | None) -> tuple[str, nn.Conv2d, bool] | None:
    """The first conv the traced forward calls (not the first one registered): its path, the module, and
    whether it takes the model's input directly (then the input must have its ``in_channels``). Without a graph
    (before tracing), the first one registered."""
    if graph is None:
        return next(((p, m, False) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    first_input = next((n for n in graph.nodes if n.op == "placeholder"), None)
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(str(node.target))
        if isinstance(module, nn.Conv2d):
            direct = bool(node.args) and node.args[0] is first_input  # takes example_inputs[0] itself
            return str(node.target), module, direct
    return None


def _hf_config(model: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """Channels and image size from a Hugging Face ``model.config`` (``num_channels``, ``image_size``)."""
    config = getattr(model, "config", None)
    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
    sizes = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (tuple, list)) else []
    ok = len(sizes) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)
    ok_channels = isinstance(channels, int) and not isinstance(channels, bool) and channels > 0
    return (channels if ok_channels else None), ((sizes[0], sizes[1]) if ok else None)


def default_input_shapes(model: nn.Module, graph: fx.Graph | None) -> list[tuple[int, int, int, int]]:
    """Candidate default inputs ``(1, C, H, W)`` for ``model`` traced as ``graph``, most likely first.

    H and W come from timm's ``pretrained_cfg["input_size"]`` or a Hugging Face ``config.image_size`` when
    present, else 224. C is a Hugging Face ``config.num_channels``, then the ``in_channels`` of the first conv
    the forward calls (right for models built with ``in_chans=1``), then timm's cfg channels (right when a
    space-to-depth stem precedes the first conv), then 3.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    hf_channels, hf_size = _hf_config(model)
    if size is not None and len(size) == 3:
        height, width = int(size[1]), int(size[2])
    else:
        height, width = hf_size or (224, 224)
    first = _first_conv(model, graph)
    channels = [hf_channels] if hf_channels is not None else []
    channels += [first[1].in_channels] if first is not None else []
    channels += [int(size[0])] if size is not None and len(size) == 3 else []
    shapes = [(1, c, height, width) for c in dict.fromkeys([*channels, 3])]
    built = patch_embed_size(model)  # a timm ViT built with img_size=64 still has a 224 pretrained_cfg
    if built is not None and built != (height, width):
        shapes.insert(0, (1, shapes[0][1], *built))
    return shapes


def patch_embed_size(model: nn.Module) -> tuple[int, int] | None:
    """The image size a fixed-size patch embedding was built for (timm's ``PatchEmbed.img_size``), if any."""
    for module in model.modules():
        size = getattr(module, "img_size", None) if getattr(module, "strict_img_size", True) else None
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(type(n) is int and n > 0 for n in size):
            return int(size[0]), int(size[1])
    return None


def as_inputs(example_inputs: object) -> tuple[Tensor, ...] | None:
    """``example_inputs`` as a tuple of tensors (``None`` stays ``None``).

    Raises:
        TypeError: Not a tensor or a tuple/list of tensors (a string, a dict, a shape, ...).
        ValueError: An empty tuple/list.
    """
    if example_inputs is None:
        return None
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs:
        raise ValueError(
            "example_inputs is empty; pass a tensor (or a tuple of tensors), e.g. torch.randn(1, 3, 224, 224)"
        )
    if len(inputs) > 1 and all(isinstance(x, int) and not isinstance(x, bool) for x in inputs):
        shape = ", ".join(map(str, inputs))
        raise TypeError(f"example_inputs is a shape ({shape}), not a tensor; pass torch.randn({shape})")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            where = "example_inputs" if len(inputs) == 1 and inputs[0] is example_inputs else f"example_inputs[{i}]"
            raise TypeError(
                f"{where} is a {type(x).__name__} ({x!r:.40}); pass a tensor or a tuple of tensors, "
                "e.g. torch.randn(1, 3, 224, 224)"
            )
    return inputs


def _check_inputs(model: nn.Module, graph: fx.Graph, inputs: Sequence[Any]) -> None:
    first = _first_conv(model, graph)
    x = inputs[0] if inputs else None
    if first is None or x is None or not first[2]:
        return  # the input reaches the first conv through other code (space-to-depth, ...): propagation checks it
    path, conv, _ = first
    if x.dim() not in (3, 4):
        raise ExampleInputsError(
            f"example_inputs[0] has shape {tuple(x.shape)} (rank {x.dim()}), but the first conv `{path}` takes "
            f"(N, C, H, W) images; pass e.g. torch.randn(1, {conv.in_channels}, 224, 224)"
        )
    if x.shape[-3] != conv.in_channels:
        raise ExampleInputsError(
            f"example_inputs[0] has {x.shape[-3]} channels (shape {tuple(x.shape)}), but the first conv `{path}` "
            f"expects {conv.in_channels}; pass e.g. torch.randn(1, {conv.in_channels}, 224, 224)"
        )


def _shape_preserving_forwards() -> frozenset[Any]:
    classes: list[type[nn.Module]] = [
        nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.Identity,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
        nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d, nn.AlphaDropout,
    ]  # fmt: skip
    names = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d", "GroupNormAct", "GroupNorm1Act",
             "LayerNormAct", "LayerNormAct2d")  # fmt: skip
    try:
        from timm.layers import norm_act

        classes += [getattr(norm_act, n) for n in names if hasattr(norm_act, n)]
    except ImportError:  # pragma: no cover
        pass
    return frozenset(c.forward for c in classes)


_SHAPE_PRESERVING = _shape_preserving_forwards()


def _conv2d_output(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Output of a plain ``nn.Conv2d`` (the formula of its docs), without dispatching a fake conv."""
    if x.dim() not in (3, 4) or x.shape[-3] != conv.in_channels:
        raise RuntimeError(f"expected input with {conv.in_channels} channels, got input of shape {tuple(x.shape)}")
    size = []
    for i, n in enumerate(x.shape[-2:]):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if conv.padding == "same":
            size.append(n)
            continue
        p = 0 if isinstance(conv.padding, str) else int(conv.padding[i])  # "valid"
        out = (n + 2 * p - d * (k - 1) - 1) // s + 1
        if out <= 0:
            raise RuntimeError(f"input of shape {tuple(x.shape)} is too small for {conv}")
        size.append(out)
    return x.new_empty((*x.shape[:-3], conv.out_channels, *size))


class _Stop(Exception):
    """Raised after the last node whose shape is needed."""


class _FakePropagation(fx.Interpreter):
    """Fake-tensor interpreter that survives failing nodes: their dependents get no shape."""

    def __init__(
        self, model: nn.Module, graph: fx.Graph, stop_after: fx.Node | None = None, device: torch.device | None = None
    ) -> None:
        super().__init__(model, graph=graph)
        self.device = device  # where the inputs are: tensor constants of the forward are moved there
        self.unknown: set[fx.Node] = set()
        self.failure: tuple[fx.Node, BaseException] | None = None
        self.stop_after = stop_after

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        # Norms and activations keep their input's shape and plain convs follow a formula; running
        # them on fake tensors (BatchNorm's decomposition in particular) would dominate analysis time.
        module = self.fetch_attr(target)
        if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            if type(module).forward in _SHAPE_PRESERVING:
                return torch.empty_like(args[0])
            if type(module).forward is nn.Conv2d.forward:
                return _conv2d_output(module, args[0])
        return module.forward(*args, **kwargs)  # not module(...): the user's hooks must not see analysis

    def run_node(self, n: fx.Node) -> Any:
        n.meta.pop("val", None)
        if n.op == "output" or any(i in self.unknown for i in n.all_input_nodes):
            self.unknown.add(n)
            return None
        try:
            if n.op == "get_attr" and "constant" in n.meta:  # a tensor the forward created (see tracing.trace)
                result = n.meta["constant"]
                result = result.to(self.device) if isinstance(result, Tensor) and self.device else result
            else:
                result = super().run_node(n)
        except Exception as exc:  # data-dependent code, a head built for another input size, ...
            self.unknown.add(n)
            self.failure = self.failure or (n, exc)
            return None
        if isinstance(result, Tensor):
            n.meta["val"] = result
        if n is self.stop_after:
            raise _Stop
        return result


@dataclass(frozen=True)
class Propagation:
    """Outcome of :func:`propagate_shapes`.

    Attributes:
        inputs: The example inputs used (fake tensors, or meta tensors for a meta-device model).
        failure: Where propagation stopped, as a message (``None`` when every node got a value).
            Nodes depending on the failing one have no ``meta["val"]``.
        convs_without_shape: Conv calls left without a shape by the failure: their stages are not
            analysed. A failing head after the last conv (data-dependent control flow, a ``Linear``
            sized for another input) costs nothing.
    """

    inputs: tuple[Tensor, ...]
    failure: str | None
    convs_without_shape: int


def _param_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _run(model: nn.Module, graph: fx.Graph, fake: tuple[Tensor, ...], stop_after: fx.Node | None) -> Propagation:
    device = next((x.device for x in fake if isinstance(x, Tensor)), None)
    interpreter = _FakePropagation(model, graph, stop_after, device)
    # attributes_restored: a leaf's forward may cache what it computes on its module (ConViT's attention keeps its
    # `rel_indices` buffer); fake tensors must not outlive the run, or the model's next real forward uses them
    with attributes_restored(model), eval_mode(model), contextlib.suppress(_Stop):
        interpreter.run(*fake)
    failure = None
    if interpreter.failure is not None:
        node, exc = interpreter.failure
        message = str(exc).splitlines()[0] if str(exc) else ""
        failure = f"`{node.name}` (module `{module_path(node) or '<root>'}`): {type(exc).__name__}: {message}"
    modules = dict(model.named_modules())
    unknown_convs = sum(
        1 for n in interpreter.unknown if n.op == "call_module" and isinstance(modules.get(str(n.target)), nn.Conv2d)
    )
    return Propagation(fake, failure, unknown_convs)


def _on_meta(model: nn.Module) -> bool:
    """Whether every parameter and buffer of ``model`` is on the meta device (a model built there)."""
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)


def propagate_shapes(
    model: nn.Module,
    graph: fx.Graph,
    example_inputs: Tensor | Sequence[Tensor] | None,
    *,
    stop_after: fx.Node | None = None,
) -> Propagation:
    """Runs ``graph`` (traced from ``model``) on fake tensors, storing each node's result in its meta.

    A model whose parameters and buffers are all on the meta device runs on meta tensors instead
    (faster), and on fake tensors where that fails.

    Args:
        model: The traced model (it is not modified).
        graph: Its graph.
        example_inputs: Inputs to propagate; ``None`` tries :func:`default_input_shapes` in turn and
            keeps the first that reaches every conv.
        stop_after: The last node whose shape is needed (``None``: all); later nodes are not run.

    Returns:
        The inputs used and where propagation stopped, if it did.

    Raises:
        ExampleInputsError: ``example_inputs`` do not fit the first conv, or no conv got a shape.
    """
    given = example_inputs is not None
    if given:
        inputs: Sequence[Any] = as_inputs(example_inputs) or ()
        _check_inputs(model, graph, inputs)
    device, dtype = _param_device(model)
    if _on_meta(model):
        # A model built on the meta device runs on meta tensors directly: no fake-tensor dispatch, several
        # times faster. What meta tensors cannot run (a copy to the CPU, ...) is retried with fake tensors.
        metas = [tuple(x.to("meta") for x in inputs)] if given else [
            (torch.empty(s, device="meta", dtype=dtype),) for s in default_input_shapes(model, graph)
        ]  # fmt: skip
        for meta in metas:
            result = _run(model, graph, meta, stop_after)
            if result.failure is None:
                return result
            logger.debug("meta-device shape propagation stopped at %s; retrying with fake tensors", result.failure)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, _quiet_fake_tensor_log():
        if given:  # on the model's device (a meta-device model takes CPU example inputs)
            candidates = [tuple(mode.from_tensor(x).to(device) for x in inputs)]
        else:
            candidates = [(torch.empty(s, device=device, dtype=dtype),) for s in default_input_shapes(model, graph)]
        results = []
        for fake in candidates:
            results.append(_run(model, graph, fake, stop_after))
            if results[-1].convs_without_shape == 0:
                break
        best = min(results, key=lambda r: r.convs_without_shape)
        if best is not results[-1]:
            _run(model, graph, best.inputs, stop_after)  # restore its node values
    convs = sum(
        1 for n in graph.nodes if n.op == "call_module" and isinstance(model.get_submodule(str(n.target)), nn.Conv2d)
    )
    if convs and best.convs_without_shape == convs:
        shapes = ", ".join(str(tuple(x.shape)) for x in best.inputs)
        hint = (
            "pass example_inputs the model accepts"
            if given
            else "pass example_inputs=torch.randn(...) the model accepts"
        )
        raise ExampleInputsError(
            f"shape propagation with example inputs of shape {shapes} failed at {best.failure}; {hint}"
        )
    return best
