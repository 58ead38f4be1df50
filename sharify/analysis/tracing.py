"""Tracing a model with torch.fx for analysis: convs are leaves, untraceable submodules are leafed.

The tracer records, for every node, the stack of modules it was created in (torch.fx stores it in
``node.meta["nn_module_stack"]``), treats every ``nn.Conv2d`` (subclasses included) as a leaf, and
honours timm's registry of functions and modules that must not be traced when timm is installed
(no-trace modules that hold convs are traced anyway, see ``is_leaf_module``).

A submodule whose forward cannot be traced (data-dependent control flow, unsupported Python) is
retried as a leaf: sharify then sees it as one opaque call and records it in
:attr:`TraceResult.auto_leaves` with the reason. Code in the root's own forward cannot be made a leaf:
when it stops the trace (an inline head with data-dependent control flow, say), the graph traced up
to that point is kept and :attr:`TraceResult.stopped` says where; :func:`sharify.plan` analyses that
part and raises :class:`~sharify.errors.UntraceableError` only when it holds nothing to share.

Two habits of real model code are handled while tracing:

* The root is called with its example inputs only, as a user calls it: forward parameters the inputs do not
  supply keep their defaults, ``**kwargs`` is empty. fx would make each of them a placeholder, and Hugging
  Face's ``labels=None, output_hidden_states=None, return_dict=None, **kwargs`` would stop the trace at
  ``if output_hidden_states:`` (or at ``**kwargs`` unpacked as a proxy).
* A leaf module called as ``self.bn.forward(x)`` (old CIFAR code) records a ``call_module`` node, exactly as
  ``self.bn(x)`` does: fx only intercepts ``Module.__call__``, so each leaf's ``forward`` is routed to the
  tracer for the duration of the trace (restored afterwards, also on error).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import UntraceableError

__all__ = ["LeafSpec", "TraceResult", "attributes_restored", "eval_mode", "module_path", "trace"]

logger = logging.getLogger(__name__)

#: What ``leaf_modules=`` accepts: module classes and/or module paths (``"head"``, ``"layer4.1"``).
LeafSpec = Iterable[type[nn.Module] | str]

_MAX_AUTO_LEAVES = 64


@dataclass
class TraceResult:
    """A traced model.

    Attributes:
        graph: The traced graph; ``call_module``/``get_attr`` targets are paths into the traced model.
        auto_leaves: Paths of submodules that could not be traced, with the tracing error.
        stopped: When the root's own forward could not be traced to its end, where and why (the graph
            then holds what the forward computed before that point and has no output node).
    """

    graph: fx.Graph
    auto_leaves: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None

    def untraceable_error(self, found: str) -> UntraceableError:
        """The error for a model whose partial trace (:attr:`stopped`) holds nothing to share."""
        error = UntraceableError(
            f"torch.fx cannot trace {self.stopped}; {found} before that point. sharify needs the data flow of the "
            "residual stages: make that code traceable, or move it into a submodule (which sharify then treats as "
            "an opaque call), or share a submodule that torch.fx can trace (sharify.sharify(model.<name>, "
            "inplace=True))"
        )
        error.module_path = ""  # type: ignore[attr-defined]  # the root's own code: leaf_modules cannot help
        error.reason = (self.stopped or "").partition(" (")[2].removesuffix(")")  # type: ignore[attr-defined]
        return error


def _unpatched() -> contextlib.AbstractContextManager[None]:
    """Undoes torch.fx's patches of ``Module.__getattr__``/``__call__`` for the duration (so that an op run for its
    value while tracing reads real parameters, not proxies); a private helper of torch.fx, absent in some versions."""
    revert = getattr(fx._symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


@functools.cache
def _timm_notrace() -> tuple[tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]]:
    try:
        import timm  # noqa: F401  (registers the models' notrace modules on import)
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover - timm is a dependency, but keep sharify importable without it
        return (), ()
    modules = tuple(m for m in timm_fx.get_notrace_modules() if isinstance(m, type))
    functions = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return modules, functions


class _AnalysisProxy(fx.Proxy):
    """A proxy whose ``dtype`` and ``device`` are concrete where they are known before any value is: a parameter's
    or buffer's own, and for the root's inputs the model's parameters' (the inputs an analysis runs with). Hugging
    Face forwards branch on them (``if pixel_values.dtype != self.patch_embeddings.projection.weight.dtype``),
    which a plain proxy cannot answer."""

    tracer: _AnalysisTracer

    def _known(self, name: str) -> Any:
        if self.node.op == "placeholder":
            return getattr(self.tracer, f"input_{name}")
        value = self._known_tensor() if self.node.op == "get_attr" else None
        return getattr(value, name) if isinstance(value, torch.Tensor) else None

    def _known_tensor(self) -> Any:
        """The parameter or buffer of a ``get_attr`` node (read through the module dicts: fx patches
        ``Module.__getattr__`` while tracing), else ``None``."""
        *path, leaf = str(self.node.target).split(".")
        module: nn.Module | None = self.tracer.root
        for part in path:
            module = module._modules.get(part) if module is not None else None
        return None if module is None else module._parameters.get(leaf, module._buffers.get(leaf))

    @property
    def dtype(self) -> Any:
        known = self._known("dtype")
        return fx.Proxy.__getattr__(self, "dtype") if known is None else known

    @property
    def device(self) -> Any:
        known = self._known("device")
        return fx.Proxy.__getattr__(self, "device") if known is None else known

    def __len__(self) -> int:
        value = self.tracer.value_of(self.node)
        if isinstance(value, (tuple, list, torch.Size, torch.Tensor)):
            return len(value)
        return fx.Proxy.__len__(self)


class _AnalysisTracer(fx.Tracer):
    def __init__(
        self,
        leaf_types: tuple[type[nn.Module], ...],
        leaf_paths: set[str],
        inputs: list[tuple[str, bool]] | None = None,
    ) -> None:
        timm_modules, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=timm_functions)
        self.timm_leaf_types = timm_modules
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.failed_path: str | None = None
        self._parameter_names: dict[int, str] | None = None
        self.inputs = inputs
        self.input_dtype: Any = None  # the root inputs' dtype and device (see _AnalysisProxy), set by trace()
        self.input_device: Any = None
        #: The analysis inputs (a thunk: made only when a value is needed), for :meth:`value_of`.
        self.example_inputs: Callable[[], Sequence[Any]] | None = None
        self.values: dict[fx.Node, Any] | None = None
        self.fake_mode: FakeTensorMode | None = None
        self._fake_inputs: list[Any] | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AnalysisProxy(node, self)

    # Python control flow on a proxy (``if x.shape[1] != c``, ``(*x.shape[:-1], -1, d)``) stops a plain trace.
    # Where it would, the value is computed instead, on fake tensors from the analysis inputs (lazily, only
    # then), and the trace goes on with it: the graph is specialised to those inputs, as the analysis is anyway.
    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.value_of(obj.node)
        if isinstance(value, (bool, int, float)):
            return bool(value)
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.value_of(obj.node)
        if isinstance(value, (tuple, list, torch.Size)) and all(type(v) is int for v in value):
            return iter(value)
        if isinstance(value, (tuple, list, torch.Tensor)):
            return iter([cast(Any, obj)[i] for i in range(len(value))])
        return super().iter(obj)

    def value_of(self, node: fx.Node) -> Any:
        """What ``node`` computes on fake tensors of the analysis inputs, or ``None`` where that is unknown."""
        if self.values is None:
            return None
        if node not in self.values:
            self.values[node] = None  # also on failure, and against cycles
            try:
                self.values[node] = self._evaluate(node)
            except Exception:  # unknown: the trace fails as it would without values
                logger.debug("no value for %s while tracing", node.name, exc_info=True)
        return self.values[node]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            index = [n for n in node.graph.nodes if n.op == "placeholder"].index(node)
            return self.values_inputs()[index]
        if node.op == "get_attr":
            return _AnalysisProxy(node, self)._known_tensor()
        if any(self.value_of(n) is None for n in node.all_input_nodes):
            return None
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.value_of)
        assert self.fake_mode is not None
        with _unpatched(), self.fake_mode:
            if node.op == "call_function":
                return node.target(*args, **kwargs)  # type: ignore[operator]
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
            module = self.root.get_submodule(str(node.target))
            if node.op == "call_module" and not any(True for _ in module.children()):
                return type(module).forward(module, *args, **kwargs)  # not __call__: the tracer intercepts that
        return None

    def values_inputs(self) -> list[Any]:
        """The analysis inputs as fake tensors (made once per trace)."""
        if self._fake_inputs is None:
            assert self.fake_mode is not None and self.example_inputs is not None
            self._fake_inputs = [self.fake_mode.from_tensor(x) for x in self.example_inputs()]
        return self._fake_inputs

    def create_args_for_root(
        self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
    ) -> tuple[Callable[..., Any], list[Any]]:
        # The root is called with its inputs only, as a user calls it: every other parameter takes its default
        # in Python (fx's concrete_args would leave placeholders behind and cannot see through decorators).
        if not is_module or self.inputs is None or concrete_args is not None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        proxies = [(name, kw, self.create_proxy("placeholder", name, (), {})) for name, kw in self.inputs]
        keyword = {name: proxy for name, kw, proxy in proxies if kw}

        def call(root: nn.Module, *args: Any) -> Any:
            return root_fn(root, *args, **keyword)

        return call, [self.root, *(proxy for _, kw, proxy in proxies if not kw)]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # fx finds a parameter's path by scanning root.named_parameters() on every access, which is
        # quadratic in large models; look it up in a map built once per trace instead.
        if isinstance(attr_val, nn.Parameter):
            if self._parameter_names is None:
                self._parameter_names = {}
                for path, p in self.root.named_parameters():
                    self._parameter_names.setdefault(id(p), path)
            name = self._parameter_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Conv2d) or module_qualified_name in self.leaf_paths:
            return True
        if isinstance(m, self.leaf_types):
            return True
        if isinstance(m, self.timm_leaf_types):
            # timm marks modules as no-trace for feature extraction; a leaf would hide the convs
            # sharify looks for, so those holding convs are traced (and leafed only if that fails).
            return not any(isinstance(c, nn.Conv2d) for c in m.modules())
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The first call_module an exception passes through is the innermost failing module.
            if self.failed_path is None:
                self.failed_path = self.path_of_module(m)
            raise


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode and restores each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _floating_parameter(model: nn.Module) -> tuple[Any, Any]:
    """The dtype and device of the model's first floating-point parameter (``None, None`` without one)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (None, None) if p is None else (p.dtype, p.device)


def root_inputs(model: nn.Module, num_inputs: int) -> list[tuple[str, bool]] | None:
    """The forward parameters of ``model`` that are inputs when it is called with ``num_inputs`` tensors.

    The first ``num_inputs`` positional parameters (``*args`` included) and every parameter without a
    default are inputs; the others keep their default, ``**kwargs`` stays empty. Each input comes as
    ``(name, keyword_only)``; ``None`` when the forward has no inspectable signature.

    Raises:
        TypeError: The forward takes fewer positional inputs than ``num_inputs``.
    """
    try:
        params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())[1:]  # not self
    except (TypeError, ValueError):  # a builtin or C-implemented forward
        return None
    inputs: list[tuple[str, bool]] = []
    positional = 0
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            inputs += [(f"{p.name}_{i}", False) for i in range(num_inputs - positional)]
            positional = max(positional, num_inputs)
        elif p.kind is p.KEYWORD_ONLY:
            inputs += [(p.name, True)] if p.default is p.empty else []
        elif p.kind is not p.VAR_KEYWORD and (positional < num_inputs or p.default is p.empty):
            inputs.append((p.name, False))
            positional += 1
    if positional < num_inputs:
        raise TypeError(
            f"example_inputs has {num_inputs} tensors, but {type(model).__name__}.forward takes {positional} "
            "positional inputs; pass one tensor per positional input of the forward"
        )
    return inputs


@contextlib.contextmanager
def _direct_leaf_calls(tracer: _AnalysisTracer, model: nn.Module) -> Iterator[None]:
    """Routes ``leaf.forward(x)`` to the tracer (a ``call_module`` node) while tracing; restores every leaf."""
    patched: list[tuple[nn.Module, Any]] = []
    missing = object()

    def routed(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return tracer.call_module(module, forward, args, kwargs)

        return call

    try:
        for path, module in model.named_modules():
            if path and tracer.is_leaf_module(module, path):
                patched.append((module, module.__dict__.get("forward", missing)))
                module.__dict__["forward"] = routed(module, module.forward)
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is missing:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous


@contextlib.contextmanager
def attributes_restored(model: nn.Module) -> Iterator[None]:
    """Restores every module's attributes as they were afterwards, also on error.

    A forward may cache what it computes on its modules (RAFT's correlation block keeps tensors, torchvision's
    ``MultiScaleRoIAlign`` its scales on first use, LeViT's attention a dict of biases): proxies of a trace or
    fake tensors of a recorded run must not outlive it, or the model's next real forward (or trace) computes
    with them. Attributes are restored by identity, and the contents of dicts, lists and sets held in them
    (``_parameters``, ``_buffers``, caches) one level deep, in place.
    """
    saved = []
    for module in model.modules():
        attributes = dict(module.__dict__)
        contents = {k: v.copy() for k, v in attributes.items() if isinstance(v, (dict, list, set))}
        saved.append((module, attributes, contents))
    try:
        yield
    finally:
        for module, attributes, contents in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, content in contents.items():
                container = attributes[name]
                container.clear()
                if isinstance(container, list):
                    container.extend(content)
                else:
                    container.update(content)


def trace(
    model: nn.Module,
    leaf_modules: LeafSpec | None = None,
    *,
    num_inputs: int = 1,
    example_inputs: Callable[[], Sequence[Tensor]] | None = None,
) -> TraceResult:
    """Traces ``model`` (in eval mode, restored afterwards) into a graph over its modules.

    Args:
        model: The model to trace; it is not modified.
        leaf_modules: Extra module classes or paths not to trace into.
        num_inputs: How many positional inputs the model is called with; later parameters with a default
            keep that default (see :func:`root_inputs`).
        example_inputs: Makes the analysis inputs; where Python control flow needs a value the trace cannot
            give (``len(x.shape)``, ``if x.size(1) != c``), it is computed on fake tensors of these inputs
            (only then: most models never call it). ``None``: such code stops the trace.

    Returns:
        The graph, the submodules that had to be treated as leaves, and where the root's forward stopped
        the trace, if it did.

    Raises:
        UntraceableError: The root's own forward cannot be traced before it calls any module, or a
            submodule stays untraceable even with its failing children leafed. Its ``module_path``
            attribute is the failing submodule's path, ``""`` for the root's own forward.
    """
    user_types = tuple(x for x in leaf_modules or () if isinstance(x, type))
    leaf_paths = {x for x in leaf_modules or () if isinstance(x, str)}
    inputs = root_inputs(model, num_inputs)
    auto_leaves: dict[str, str] = {}
    stopped: str | None = None
    with eval_mode(model):
        while True:
            tracer = _AnalysisTracer(user_types, leaf_paths | set(auto_leaves), inputs)
            tracer.input_dtype, tracer.input_device = _floating_parameter(model)
            if example_inputs is not None:
                tracer.example_inputs, tracer.values = example_inputs, {}
                tracer.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
            try:
                with attributes_restored(model), _direct_leaf_calls(tracer, model):
                    graph = tracer.trace(model)
                break
            except Exception as exc:  # torch.fx raises many kinds of errors for untraceable code
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                path = tracer.failed_path
                partial = getattr(tracer, "graph", None)
                if not path and partial is not None and _consistent(partial) and _calls_modules(partial):
                    # The root's own forward stopped after calling modules: keep what was traced up to there.
                    stopped = f"`{type(model).__name__}.forward` ({reason})"
                    logger.info("the trace of %s stopped: analysing the graph traced before that point", stopped)
                    graph = partial
                    break
                if not path or path in auto_leaves or len(auto_leaves) >= _MAX_AUTO_LEAVES:
                    raise _untraceable(model, path, reason) from exc
                logger.info("treating %s as a leaf: it cannot be traced (%s)", path, reason)
                auto_leaves[path] = reason
    _keep_constants(tracer, graph)
    return TraceResult(graph, auto_leaves, stopped)


def _keep_constants(tracer: fx.Tracer, graph: fx.Graph) -> None:
    """Stores the tensors the forward created during the trace (``torch.tensor(...)`` in its code) in the
    meta of the ``get_attr`` nodes that read them (``node.meta["constant"]``).

    torch.fx registers such a tensor on the traced root as ``_tensor_constant<i>``; :func:`attributes_restored`
    removes it again (the user's model gains no attributes), so the graph carries the value itself.
    """
    created = {name: value for value, name in getattr(tracer, "tensor_attrs", {}).items()}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in created and not _resolves(tracer.root, str(node.target)):
            node.meta["constant"] = created[str(node.target)]


def _resolves(model: nn.Module, target: str) -> bool:
    owner: Any = model
    for part in target.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True


def _calls_modules(graph: fx.Graph) -> bool:
    return any(n.op == "call_module" for n in graph.nodes)


def _consistent(graph: fx.Graph) -> bool:
    """Whether a partial graph only refers to its own nodes (one cut inside a submodule's call may not)."""
    nodes = set(graph.nodes)
    return all(i in nodes for n in graph.nodes for i in n.all_input_nodes)


def _untraceable(model: nn.Module, path: str | None, reason: str) -> UntraceableError:
    if path:
        error = UntraceableError(
            f"torch.fx cannot trace module `{path}` ({reason}). sharify needs the data flow of the residual "
            "stages: make that code traceable, or pass leaf_modules=[...] naming the untraceable submodules "
            "(classes or paths) so they are treated as opaque calls."
        )
    else:  # leaf_modules cannot help with the root's own code
        error = UntraceableError(
            f"torch.fx cannot trace `{type(model).__name__}.forward` ({reason}). sharify needs the data flow of "
            "the residual stages: share a submodule that torch.fx can trace (sharify.sharify(model.<name>, "
            "inplace=True)), or pass example_inputs= matching the forward's arguments"
        )
    error.module_path = path or ""  # type: ignore[attr-defined]
    error.reason = reason  # type: ignore[attr-defined]
    return error


def module_path(node: fx.Node) -> str:
    """Path of the innermost module a node was created in (its own path for ``call_module``)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(next(reversed(stack.values()))[0])
