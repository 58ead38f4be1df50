"""The modules a sharified model is made of: shared-tensor holders and the convs that read them.

A sharing group's weight (and bias) is *owned once* by a :class:`SharedConvParams` holder. All holders
live in one :class:`SharedStore` registered on the sharified module as ``module.sharify_shared``; holders
are nested by key, so the state_dict key of a group is e.g. ``sharify_shared.layer1.conv2.weight``.
A module sharified inside a bigger model (``sharify(det.backbone.body, inplace=True)``) keeps its
store there: the enclosing model's state_dict key is ``backbone.body.sharify_shared.layer1.conv2.weight``
and, seen from the enclosing model, the group's key is prefixed by the store's place
(``backbone.body.layer1.conv2``; see :func:`shared_stores` and :func:`shared_groups`).

The member convs keep their place in the tree and their class hierarchy: each member's class is
swapped to ``Shared<Class>``, a subclass of its original class (``SharedConv2d`` for
``nn.Conv2d``, ``SharedStdConv2d`` for timm's ``StdConv2d``, ...) whose ``weight``/``bias`` are
properties reading the holder at call time. The original ``forward`` runs unchanged, so conv
variants with their own forward (weight standardisation, "same" padding) keep working, and
``isinstance`` checks, hooks and references to the conv object stay valid. Because the member does
not register the tensor, every shared tensor has exactly one state_dict key and
``model.parameters()`` yields it once; ``.to()``, ``to_empty()`` and ``load_state_dict(assign=True)``
replace the tensor in one place and every member sees the new one.

Assigning ``conv.weight = ...`` (as conv-BN fusion helpers do on a copy) un-shares only that conv:
it becomes an instance of its original class again with its own copies of the tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._wrappers import unwrap

__all__ = [
    "DELTA_PARAMETERS",
    "Delta",
    "SHARED_STORE_NAME",
    "SharedConv2d",
    "SharedConvMixin",
    "SharedConvParams",
    "SharedStore",
    "cached_weights",
    "is_shared_conv",
    "holder_paths",
    "shared_class",
    "shared_groups",
    "shared_stores",
]

#: Attribute under which the store of shared tensors is registered on the model's root.
SHARED_STORE_NAME = "sharify_shared"
#: The parameters of a member's low-rank delta (relaxed sharing, ``delta_rank``): see :class:`SharedConvMixin`.
DELTA_PARAMETERS: tuple[str, ...] = ("delta_b", "delta_a", "delta_bias")


class SharedConvParams(nn.Module):
    """Owns the weight (and bias) of one sharing group.

    Args:
        weight: Initial value of the shared weight.
        bias: Initial value of the shared bias, or ``None`` when the members have no bias.
        key: The group's key in the store, e.g. ``"layer1.conv2"``.
        stage: Module path of the stage the members belong to (informational).
        position: The position selector that picked the members (informational).
        method: ``"share"`` (the members are the group's convs) or ``"basis"`` (the members are the
            shared-basis convs inside :class:`~sharify.rewrite.basis.BasisConv2d` modules).
        init: How the tensor was initialised (informational; ``"scaled"`` tells the report that
            members apply per-channel gains, possibly folded into their BatchNorm).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        key: str,
        stage: str = "",
        position: str = "",
        method: str = "share",
        init: str = "",
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.key = key
        self.stage = stage
        self.position = position
        self.method = method
        self.init = init

    def extra_repr(self) -> str:
        bias = "" if self.bias is None else f", bias={tuple(self.bias.shape)}"
        return f"key={self.key!r}, weight={tuple(self.weight.shape)}{bias}"


class SharedStore(nn.Module):
    """Container of all holders of a model, registered as ``model.sharify_shared``.

    Its ``forward`` returns its first argument unchanged, so containers that call every child in
    order (a root ``nn.Sequential``, timm's ``FeatureListNet``) pass through it.
    """

    def __init__(self, options: dict[str, Any] | None = None, analysis: dict[str, Any] | None = None) -> None:
        super().__init__()
        #: The sharing options the model was made with (JSON-ready; see :attr:`SharingPlan.options`).
        self.options: dict[str, Any] = dict(options or {})
        #: What the analysis ran with, so it can be repeated (JSON-ready): ``input_shapes``,
        #: ``input_dtypes`` and ``leaf_modules`` (see :class:`~sharify.planning.plan.SharingPlan`).
        self.analysis: dict[str, Any] = dict(analysis or {})
        #: With ``align=True``: the channel permutations applied, per conv path ``{"in"/"out": order}``
        #: (new channel ``k`` is the original's ``order[k]``), so that the report compares like channels.
        #: Not part of the state_dict (a loaded model does not need it).
        self.alignment: dict[str, dict[str, list[int]]] = {}

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x

    def holders(self) -> dict[str, SharedConvParams]:
        """All holders by key, in registration order."""
        return {m.key: m for m in self.modules() if isinstance(m, SharedConvParams)}

    def add_holder(self, holder: SharedConvParams) -> None:
        """Registers ``holder`` under ``holder.key``, creating the intermediate containers."""
        *parents, leaf = holder.key.split(".")
        node: nn.Module = self
        for part in parents:
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        node.add_module(leaf, holder)


#: Member weights computed once inside :func:`cached_weights`, by ``id`` of the member (a copy made inside the
#: context is not cached: its id is new).
_WEIGHT_CACHE: dict[int, dict[str, Tensor | None]] = {}


@contextlib.contextmanager
def cached_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this context, each member conv of ``model`` computes its weight and bias once and reuses them.

    A member with a low-rank delta (``delta_rank``/``param_budget``) or a ``shared_gain`` computes
    ``W + B @ A`` (times the gain) at every forward, so that training updates the shared tensor and the
    deltas. For inference that sum is the same at every call: ``with sharify.cached_weights(model):``
    around an evaluation loop computes it once per member, and the forward then costs what the original
    model's does. Members without a delta or gain read the shared tensor directly and gain nothing.

    The contract is that of ``torch.nn.utils.parametrize.cached()``: do not update the weights inside the
    context (an optimizer step, ``load_state_dict``), they would not be seen; with autograd on, one forward
    and backward per context. Nested contexts and several models are fine; leaving the context drops the
    tensors it cached.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    model = _check_module(model, "cached_weights")
    added = [id(m) for m in model.modules() if isinstance(m, SharedConvMixin) and id(m) not in _WEIGHT_CACHE]
    _WEIGHT_CACHE.update({key: {} for key in added})
    try:
        yield model
    finally:
        for key in added:
            _WEIGHT_CACHE.pop(key, None)


class SharedConvMixin:
    """Turns an instance of a conv class into a member of a sharing group.

    Never instantiated directly: :func:`shared_class` builds ``Shared<Base>`` classes and the
    rewrite swaps a conv's ``__class__`` to one of them. The holder is kept in the instance's
    ``__dict__`` (not registered as a submodule), so the shared tensors have a single owner.

    A member may own a ``shared_gain`` parameter (one value per output channel, ``init="scaled"``
    where no BatchNorm follows to absorb it): it then computes with ``gain * shared weight``.

    With ``delta_rank`` (relaxed sharing) a member also owns a low-rank delta: ``delta_b`` of shape
    ``(out, r)`` and ``delta_a`` of shape ``(r, in/groups * kh * kw)``, and, when the convs have a bias,
    ``delta_bias`` (``out``). It then computes with ``gain * (W + (delta_b @ delta_a).view_as(W))`` and
    ``gain * (b + delta_bias)``: the sum is materialised once per forward (a ``(out, r) @ (r, d)`` product,
    small next to the convolution), never as extra convolutions over the activations.
    """

    _sharify_base: type[nn.Module]
    _sharify_holder: SharedConvParams
    #: Parameters a member owns only while it reads the holder: :func:`detach_from_holder` drops them.
    _sharify_member_parameters: tuple[str, ...] = ("shared_gain", *DELTA_PARAMETERS)

    @property
    def weight(self) -> Tensor:
        return self._sharify_weight() if not _WEIGHT_CACHE else self._sharify_cached("weight")  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return self._sharify_bias() if not _WEIGHT_CACHE else self._sharify_cached("bias")

    def _sharify_cached(self, name: str) -> Tensor | None:
        """``weight`` or ``bias`` inside :func:`cached_weights`: computed on first use, then reused."""
        compute = self._sharify_weight if name == "weight" else self._sharify_bias
        cache = _WEIGHT_CACHE.get(id(self))
        if cache is None:  # another model is cached, not this member
            return compute()
        if name not in cache:
            cache[name] = compute()
        return cache[name]

    def _sharify_weight(self) -> Tensor:
        w: Tensor = self._sharify_holder.weight
        params = self._parameters  # type: ignore[attr-defined]
        up, down = params.get("delta_b"), params.get("delta_a")
        if up is not None and down is not None:
            w = torch.addmm(w.flatten(1), up, down).view_as(w)  # one fused W + B @ A
        gain = params.get("shared_gain")
        return w if gain is None else w * gain.view(-1, *([1] * (w.dim() - 1)))

    def _sharify_bias(self) -> Tensor | None:
        b = self._sharify_holder.bias
        params = self._parameters  # type: ignore[attr-defined]
        delta = params.get("delta_bias")
        if b is not None and delta is not None:
            b = b + delta
        gain = params.get("shared_gain")
        return b if b is None or gain is None else b * gain

    @property
    def delta_rank(self) -> int:
        """Rank of the member's own low-rank delta (0: the member computes with the shared weight alone)."""
        down = self._parameters.get("delta_a")  # type: ignore[attr-defined]
        return 0 if down is None else int(down.shape[0])

    def _sharify_detached_tensors(self) -> dict[str, Tensor | None]:
        """What the member computes with, as the tensors of an ordinary conv (its weight and bias, gain applied)."""
        return {"weight": self._sharify_weight(), "bias": self._sharify_bias()}

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias") and "_sharify_holder" in self.__dict__:
            detach_from_holder(self)  # type: ignore[arg-type]
            setattr(self, name, value)  # now dispatched to the original class
            return
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared={self._sharify_holder.key!r}"  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Dynamic classes cannot be pickled by name: rebuild from the (importable) base class.
        return _new_shared_instance, (self._sharify_base,), self.__getstate__()


class SharedConv2d(SharedConvMixin, nn.Conv2d):  # type: ignore[override]  # weight/bias become read-only views
    """An ``nn.Conv2d`` whose weight and bias belong to a :class:`SharedConvParams` holder."""

    _sharify_base = nn.Conv2d


_SHARED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: SharedConv2d}


def shared_class(base: type[nn.Module]) -> type[nn.Module]:
    """Returns the ``Shared<base>`` class (created once per base class)."""
    if issubclass(base, SharedConvMixin):
        raise TypeError(f"{base.__name__} is already a shared conv class")
    cls = _SHARED_CLASSES.get(base)
    if cls is None:
        name = f"Shared{base.__name__}"
        cls = type(name, (SharedConvMixin, base), {"_sharify_base": base, "__module__": __name__, "__qualname__": name})
        _SHARED_CLASSES[base] = cls
    return cls


def _new_shared_instance(base: type[nn.Module]) -> nn.Module:
    cls = shared_class(base)
    return cls.__new__(cls)


def is_shared_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a member conv reading a shared holder."""
    return isinstance(module, SharedConvMixin)


class Delta(NamedTuple):
    """A member's low-rank delta: ``up @ down`` (``(out, r) @ (r, d)``) added to the shared weight viewed as
    ``(out, d)``, and ``bias`` (``out``, or ``None`` when the convs have none) added to the shared bias."""

    up: Tensor
    down: Tensor
    bias: Tensor | None


def attach_to_holder(
    conv: nn.Module, holder: SharedConvParams, gain: Tensor | None = None, delta: Delta | None = None
) -> None:
    """Makes ``conv`` a member of ``holder``'s group; its own weight and bias are dropped.

    Args:
        conv: The conv (its class is swapped to ``Shared<Class>``).
        holder: The group's holder.
        gain: Optional per-output-channel gain the member applies to the shared tensors.
        delta: Optional low-rank delta the member adds to the shared tensors (before the gain).
    """
    base = type(conv)
    del conv._parameters["weight"]
    del conv._parameters["bias"]
    if gain is not None:
        conv._parameters["shared_gain"] = nn.Parameter(gain)
    if delta is not None:
        conv._parameters["delta_b"] = nn.Parameter(delta.up)
        conv._parameters["delta_a"] = nn.Parameter(delta.down)
        if delta.bias is not None:
            conv._parameters["delta_bias"] = nn.Parameter(delta.bias)
    conv.__class__ = shared_class(base)
    conv.__dict__["_sharify_holder"] = holder


def detach_from_holder(conv: nn.Module) -> None:
    """Inverse of :func:`attach_to_holder`: ``conv`` gets its own copies of the tensors it computes with."""
    with torch.no_grad():
        values = conv._sharify_detached_tensors()  # type: ignore[operator]  # gain (and a folded BatchNorm) applied
    holder: SharedConvParams = conv.__dict__.pop("_sharify_holder")
    for name in conv._sharify_member_parameters:  # type: ignore[union-attr]
        conv._parameters.pop(name, None)
    conv.__class__ = conv._sharify_base  # type: ignore[assignment]
    for name, value in values.items():
        grad = getattr(holder, name) is not None and getattr(holder, name).requires_grad
        param = None if value is None else nn.Parameter(value.detach().clone(), requires_grad=grad)
        conv.register_parameter(name, param)


def _check_module(model: object, caller: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a torch.nn.Module, got {type(model).__name__}")
    return unwrap(model)[0]


def scoped_key(scope: str, key: str) -> str:
    """A holder's key as seen from the enclosing model: ``key`` prefixed by the path of its store's module."""
    return f"{scope}.{key}" if scope and key else scope or key


def shared_stores(model: nn.Module) -> dict[str, SharedStore]:
    """Every store of shared tensors in ``model``, by the path of the module it is registered on.

    ``""`` is the root's own store (``sharify(model)``); ``"backbone.body"`` the store of a submodule
    sharified in place (``sharify(det.backbone.body, inplace=True)``). Wrappers are looked through.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    model = _check_module(model, "shared_stores")
    return {path.rpartition(".")[0]: m for path, m in model.named_modules() if isinstance(m, SharedStore)}


def holder_paths(model: nn.Module) -> dict[str, str]:
    """The module path of every registered holder (its state_dict prefix), by group key (see :func:`shared_groups`)."""
    model = _check_module(model, "holder_paths")
    out: dict[str, str] = {}
    for path, store in model.named_modules():
        if isinstance(store, SharedStore):
            scope = path.rpartition(".")[0]
            for sub, holder in store.named_modules(prefix=path):
                if isinstance(holder, SharedConvParams):
                    out.setdefault(scoped_key(scope, holder.key), sub)
    return out


def shared_groups(model: nn.Module) -> dict[str, tuple[SharedConvParams, list[str]]]:
    """Holders of ``model`` by key, each with the paths of the member convs that read it.

    Stores registered at any depth are found: a group of a submodule sharified in place has the
    submodule's path as a prefix of its key (``backbone.body.layer1.conv2``), so keys stay unique
    when several submodules are sharified independently. A holder that no conv reads is listed with
    no members. Derived from the module tree, so it stays right after ``load_state_dict``, ``to()`` or
    pickling. DDP, DataParallel and ``torch.compile`` wrappers are looked through (reading only): the
    paths are the bare model's, so :func:`sharify.orthogonality_loss` and :func:`sharify.report` work
    on a wrapped model as on the bare one.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    model = _check_module(model, "shared_groups")
    holders: dict[str, SharedConvParams] = {}
    for scope, store in shared_stores(model).items():
        for key, holder in store.holders().items():
            holders.setdefault(scoped_key(scope, key), holder)
    members: dict[int, list[str]] = {id(h): [] for h in holders.values()}
    for path, module in model.named_modules():
        if isinstance(module, SharedConvMixin):
            members.setdefault(id(module._sharify_holder), []).append(path)
    return {key: (h, members[id(h)]) for key, h in holders.items()}
