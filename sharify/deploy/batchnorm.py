"""Conv-BN folding for inference that keeps every shared weight shared: :func:`fold_batchnorm`.

torch's usual fusion (``torch.nn.utils.fusion.fuse_conv_bn_eval``, ``torch.fx.experimental.optimization.fuse``)
multiplies a conv's weight by its BatchNorm's per-channel factor. Each block's BatchNorm has its own
statistics, so on a sharified model it gives every member followed by a BatchNorm its own weight again.
:func:`fold_batchnorm` folds differently where the conv is a member: the BatchNorm becomes a per-member,
per-output-channel scale and bias applied after the shared convolution,
``conv(x, W_shared) * fold_scale + fold_bias`` (two vectors of ``C_out`` per member; a member's
``shared_gain`` is absorbed into its scale), so the folded model still stores each shared tensor once.
Every other conv -> BatchNorm pair folds as usual (``fuse_conv_bn_weights``: new weight and bias).

Filter-basis convs (:class:`~sharify.rewrite.basis.BasisConv2d`, ``method="basis"``) compute
``coeff(norm(concat(unique(x), shared(x))))``: their BatchNorm follows a concatenation, not a conv, and folds
forward into the 1x1 coefficients instead (exact for a 1x1 conv without padding); the BatchNorm of the block
after the basis conv then folds into the coefficients as usual. The shared basis is left as it is.

The pairs come from the torch.fx graph (:func:`sharify.analysis.folding.conv_bn_pairs`), not from module
names. A folded BatchNorm becomes ``nn.Identity``, timm's ``BatchNormAct2d`` (normalisation, then activation) an
``nn.Sequential`` of its dropout and activation; another BatchNorm subclass with a forward of its own stays in
place with identity statistics (weight 1, bias 0, mean 0, variance 1, ``eps`` 0).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..analysis.folding import conv_bn_pairs, is_batchnorm, trace_for_folding
from ..errors import UntraceableError
from ..layers import SharedConvMixin, SharedConvParams, is_shared_conv, shared_class
from ..rewrite.basis import BasisConv2d
from ._checks import check_model_and_flag

__all__ = ["FoldedConvMixin", "basis_norm_foldable", "fold_batchnorm", "folded_class"]

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=nn.Module)

#: Convs whose forward is ``conv(x, weight, bias)``: folding into their weight is exact.
_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: BatchNorms whose forward only normalises: folded, they become ``nn.Identity``.
_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FoldedConvMixin(SharedConvMixin):
    """A member conv followed by a folded BatchNorm: ``forward(x) * fold_scale + fold_bias`` per output channel.

    Never instantiated directly: :func:`fold_batchnorm` swaps a member's class to :func:`folded_class` of it and
    registers its ``fold_scale`` and ``fold_bias`` parameters. The member's own forward (reading the shared
    tensors) runs unchanged. Detached from its holder (``conv.weight = ...``, :func:`sharify.unshare`), it
    becomes an ordinary conv with the folded weight and bias, as torch's fusion would have made it.
    """

    _sharify_member_parameters = (*SharedConvMixin._sharify_member_parameters, "fold_scale", "fold_bias")

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        y = super().forward(*args, **kwargs)  # type: ignore[misc]
        shape = (-1,) + (1,) * len(self.kernel_size)  # type: ignore[attr-defined]  # channels, then spatial dims
        return torch.addcmul(self.fold_bias.view(shape), y, self.fold_scale.view(shape))  # type: ignore[attr-defined]

    def _sharify_detached_tensors(self) -> dict[str, Tensor | None]:
        scale, shift = self._parameters["fold_scale"], self._parameters["fold_bias"]  # type: ignore[attr-defined]
        assert scale is not None and shift is not None  # registered by fold_batchnorm
        weight, bias = self.weight, self.bias
        view = [1] * weight.dim()
        view[1 if isinstance(self, nn.modules.conv._ConvTransposeNd) else 0] = -1  # the output channels
        return {"weight": weight * scale.view(view), "bias": shift if bias is None else bias * scale + shift}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded BatchNorm"

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _new_folded_instance, (self._sharify_base,), self.__getstate__()


_FOLDED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def folded_class(member_class: type[nn.Module]) -> type[nn.Module]:
    """``Folded<Shared<Base>>``: the class of a member whose BatchNorm :func:`fold_batchnorm` folded."""
    if issubclass(member_class, FoldedConvMixin):
        return member_class
    if not issubclass(member_class, SharedConvMixin):
        raise TypeError(f"{member_class.__name__} is not a shared conv class")
    cls = _FOLDED_CLASSES.get(member_class)
    if cls is None:
        name = f"Folded{member_class.__name__}"
        cls = type(name, (FoldedConvMixin, member_class), {"__module__": __name__, "__qualname__": name})
        _FOLDED_CLASSES[member_class] = cls
    return cls


def _new_folded_instance(base: type[nn.Module]) -> nn.Module:
    cls = folded_class(shared_class(base))
    return cls.__new__(cls)


def _norm_affine(norm: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``norm(x) = x * scale + shift`` per channel in eval mode (torch's fusion formula)."""
    mean, var = norm.running_mean, norm.running_var
    assert isinstance(mean, Tensor) and isinstance(var, Tensor)  # conv_bn_pairs checked the running statistics
    weight = norm.weight if isinstance(norm.weight, Tensor) else torch.ones_like(mean)
    bias = norm.bias if isinstance(norm.bias, Tensor) else torch.zeros_like(mean)
    scale = weight * torch.rsqrt(var + norm.eps)  # type: ignore[operator]
    return scale.to(dtype), (bias - mean * scale).to(dtype)


def _holder(member: nn.Module) -> SharedConvParams:
    return cast(SharedConvMixin, member)._sharify_holder


def _fold_into_member(conv: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``conv`` (a member) computes ``forward(x) * scale + shift``; its gain and any earlier folding are merged."""
    gain = conv._parameters.pop("shared_gain", None)
    if gain is not None:  # forward(x) used gain * (W x + b): the raw shared tensors now, the gain in the scale
        scale = gain * scale
    if isinstance(conv, FoldedConvMixin):  # folded before: (y * s0 + t0) * s + t
        s0, t0 = conv._parameters["fold_scale"], conv._parameters["fold_bias"]
        assert s0 is not None and t0 is not None
        scale, shift = s0 * scale, t0 * scale + shift
    grad = bool(_holder(conv).weight.requires_grad)
    conv.__class__ = folded_class(type(conv))
    conv._parameters["fold_scale"] = nn.Parameter(scale.detach().clone(), requires_grad=grad)
    conv._parameters["fold_bias"] = nn.Parameter(shift.detach().clone(), requires_grad=grad)


def _fuse_plain(conv: nn.Module, norm: nn.Module) -> None:
    """torch's fusion, in place: the conv gets the folded weight and bias."""
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias,  # type: ignore[arg-type]
        transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd),
    )  # fmt: skip
    conv.weight, conv.bias = weight, bias


def basis_norm_foldable(basis: BasisConv2d) -> bool:
    """Whether :func:`fold_batchnorm` folds the BatchNorm of ``basis`` into its 1x1 coefficients."""
    norm, coeff = basis.norm, basis.coeff
    return (
        type(basis).forward is BasisConv2d.forward
        and is_batchnorm(norm)
        and getattr(norm, "running_mean", None) is not None
        and type(coeff) is nn.Conv2d
        and coeff.kernel_size == (1, 1)
        and coeff.padding == (0, 0)
        and coeff.groups == 1
    )


def _fold_basis_norm(basis: BasisConv2d) -> None:
    """Folds a basis conv's BatchNorm forward into its 1x1 coefficients (``coeff(norm(z))`` is linear in ``z``)."""
    norm, coeff = basis.norm, basis.coeff
    with torch.no_grad():
        scale, shift = _norm_affine(norm, torch.float64)
        a = coeff.weight.double().flatten(1)  # (C_out, s + u)
        bias = a @ shift + (0 if coeff.bias is None else coeff.bias.double())
        weight = (a * scale).view_as(coeff.weight)
        grad = coeff.weight.requires_grad
        coeff.weight = nn.Parameter(weight.to(coeff.weight.dtype), requires_grad=grad)
        coeff.bias = nn.Parameter(bias.to(coeff.weight.dtype), requires_grad=grad)
    basis.norm = nn.Identity()  # type: ignore[assignment]


def _after_normalising(norm: nn.Module) -> nn.Module | None:
    """What a known norm-and-activation module does after normalising: timm's ``BatchNormAct2d``'s drop and act."""
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return nn.Sequential(norm.drop, norm.act) if type(norm) is BatchNormAct2d else None


def _remove_norm(model: nn.Module, path: str, norm: nn.Module) -> None:
    if type(norm) in _PLAIN_NORMS or type(norm).__name__ == "FrozenBatchNorm2d":
        model.set_submodule(path, nn.Identity())
        return
    rest = _after_normalising(norm)
    if rest is not None:
        model.set_submodule(path, rest)
        return
    with torch.no_grad():  # a BatchNorm subclass with a forward of its own: keep it, normalising by nothing
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            t = getattr(norm, name, None)
            if isinstance(t, Tensor):
                t.fill_(value)
        norm.eps = 0.0  # type: ignore[assignment]  # normalising by sqrt(1 + 0) is exactly the identity


def _trace_for_folding(model: nn.Module) -> fx.Graph:
    """The model's fx graph (:func:`~sharify.analysis.folding.trace_for_folding`), or a clear error."""
    name = type(model).__name__
    try:
        result = trace_for_folding(model)
    except UntraceableError as exc:
        path = getattr(exc, "module_path", "")
        where = f"module `{path}`" if path else f"`{name}.forward`"
        raise UntraceableError(
            f"fold_batchnorm cannot find the conv -> BatchNorm pairs of {name}: torch.fx cannot trace {where} "
            f"({getattr(exc, 'reason', exc)}); make that code traceable, or fold a traceable submodule "
            "(sharify.fold_batchnorm(model.<name>, inplace=True) on a copy of the model)"
        ) from exc
    if result.stopped is not None:
        raise UntraceableError(
            f"fold_batchnorm cannot find the conv -> BatchNorm pairs of {name}: torch.fx cannot trace "
            f"{result.stopped}, so the users of the convs computed before that point are unknown; make that code "
            "traceable, or fold a traceable submodule (sharify.fold_batchnorm(model.<name>, inplace=True) on a "
            "copy of the model)"
        )
    for path, reason in result.auto_leaves.items():
        logger.info("fold_batchnorm: %s cannot be traced (%s); its BatchNorms are not folded", path, reason)
    return result.graph


def fold_batchnorm(model: ModelT, *, inplace: bool = False) -> ModelT:
    """An inference model with every foldable BatchNorm folded into the conv before it, shared weights kept shared.

    A member conv's BatchNorm becomes the member's ``fold_scale`` and ``fold_bias`` (``C_out`` each), applied
    after the shared convolution; an unshared conv's folds into its weight and bias (torch's fusion); a basis
    conv's internal BatchNorm folds into its 1x1 coefficients. The folded BatchNorms become ``nn.Identity``.
    The result is in eval mode and computes what ``model.eval()`` computes, up to float rounding. Works on
    unshared models too (then it is torch's usual fusion).

    Args:
        model: The model (sharified or not), not a DDP / DataParallel / ``torch.compile`` wrapper.
        inplace: Fold ``model`` itself instead of a deep copy.

    Returns:
        The folded model (``model`` itself with ``inplace=True``), in eval mode.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``inplace`` not a bool.
        UnsupportedModelError: A TorchScript module or a wrapper: fold the bare model, then wrap the result.
        UntraceableError: torch.fx cannot trace the model's own forward, so its conv -> BatchNorm pairs are
            unknown (submodules it cannot trace are left unfolded). The model is unchanged.

    Example:
        >>> import torch, torchvision, sharify
        >>> shared = sharify.sharify(torchvision.models.resnet18()).eval()
        >>> folded = sharify.fold_batchnorm(shared)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.allclose(folded(x), shared(x), atol=1e-5), type(folded.layer1[0].bn2).__name__
        (True, 'Identity')
    """
    check_model_and_flag(model, inplace, "fold_batchnorm")
    graph = _trace_for_folding(model)  # before any change: an untraceable model stays as it was
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    for module in list(target.modules()):
        if isinstance(module, BasisConv2d) and basis_norm_foldable(module):
            _fold_basis_norm(module)
    for conv_path, norm_path in conv_bn_pairs(target, graph):
        conv, norm = target.get_submodule(conv_path), target.get_submodule(norm_path)
        if is_shared_conv(conv):
            with torch.no_grad():
                _fold_into_member(conv, *_norm_affine(norm, _holder(conv).weight.dtype))
        elif type(conv) in _PLAIN_CONVS:
            _fuse_plain(conv, norm)
        else:  # a conv with its own forward (weight standardisation, ...): scaling its weight would not be exact
            logger.info("fold_batchnorm: %s (%s) keeps its BatchNorm", conv_path, type(conv).__name__)
            continue
        _remove_norm(target, norm_path, norm)
    return target
