"""Loading an original (unshared) checkpoint into a sharified model.

A sharified model's state_dict has one key per shared tensor (``sharify_shared.<key>.weight``) where
the original had one per member conv (``layer1.0.conv2.weight``, ...). :func:`load_unshared_state_dict`
folds the members' tensors of an original checkpoint into the shared tensor with an init strategy
(``"average"`` by default: the paper's averaged init of a pretrained model) and loads the rest as is.

Training checkpoints hold the weights inside a dict (timm: ``{"state_dict": ..., "optimizer": ...}``)
and, after DDP or ``torch.compile``, under a ``module.``/``_orig_mod.`` prefix: :func:`checkpoint_weights`
finds them, for :func:`load_unshared_state_dict` and ``sharify finetune --checkpoint`` alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .._paths import names_by_identity
from .._wrappers import strip_wrapper_prefixes, unwrap
from ..layers import SHARED_STORE_NAME, SharedConvParams, SharedStore, shared_groups
from ..rewrite.delta import MemberTarget, svd_delta
from ..rewrite.init import check_init, initial_tensors

__all__ = ["EMA_KEYS", "WEIGHT_KEYS", "checkpoint_weights", "load_state", "load_unshared_state_dict", "meta_gap"]

logger = logging.getLogger(__name__)

#: Where training checkpoints keep the model's weights, in order of preference (timm's saver and
#: train.py write ``state_dict``; other loops ``model`` or ``module``) ...
WEIGHT_KEYS = ("state_dict", "model", "module")
#: ... and their EMA weights (timm: ``state_dict_ema``; some loops ``model_ema``).
EMA_KEYS = ("state_dict_ema", "model_ema")


def checkpoint_weights(obj: Any, *, ema: bool = False) -> tuple[Any, list[str]]:
    """The weights inside a training checkpoint, and the keys that led to them.

    Descends into :data:`WEIGHT_KEYS` (with ``ema=True``: :data:`EMA_KEYS`, then ``module``) while
    they hold a mapping, also nested (``{"model": {"module": {...}}}``); anything else is returned as is.
    """
    used: list[str] = []
    for key in (*EMA_KEYS, "module") if ema else WEIGHT_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            used.append(key)
    return obj, used


def meta_gap(model: nn.Module, tensors: Mapping[str, Tensor]) -> str | None:
    """The first parameter or buffer of ``model`` on the meta device that ``tensors`` does not fill, if any."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return next((n for n, t in named if t.is_meta and n not in tensors), None)


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Names of the parameters and buffers registered more than once (the model's own ties), per tensor."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    names = names_by_identity(named)
    return [group for group in names.values() if len(group) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    for first, *others in groups:
        owner, _, attr = first.rpartition(".")
        tensor = getattr(model.get_submodule(owner), attr)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, tensor)


def load_state(model: nn.Module, tensors: Mapping[str, Tensor], *, strict: bool) -> Any:
    """``model.load_state_dict``; a model (partly) on the meta device is materialised instead of left without data.

    Its tensors are replaced (``assign=True``) by copies of ``tensors`` in the model's dtypes, on the CPU
    where the model's tensor is on the meta device, else on that tensor's device: no torch warning per
    tensor about copying into a meta tensor being a no-op. Tensors the model registers under several
    names (``b.weight = a.weight``) stay one tensor.
    """
    own = model.state_dict()
    if not any(isinstance(t, Tensor) and t.is_meta for t in own.values()):
        return model.load_state_dict(tensors, strict=strict)
    like = {k: own[k] if isinstance(own.get(k), Tensor) else v for k, v in tensors.items()}
    copies = {
        k: v.to(
            device="cpu" if like[k].is_meta else like[k].device,
            dtype=like[k].dtype if v.is_floating_point() else v.dtype,
            copy=True,  # fresh memory of the model's own, not a view into the file's buffer
        )
        if isinstance(v, Tensor)
        else v  # a module's get_extra_state() value
        for k, v in tensors.items()
    }
    tied = _tied_names(model)
    result = model.load_state_dict(copies, strict=strict, assign=True)
    _retie(model, tied)  # assign=True gave each name its own tensor
    return result


def _weights(state_dict: Any) -> dict[str, Tensor]:
    """The tensors of ``state_dict`` (a state_dict or a training checkpoint holding one), prefixes removed."""
    if not isinstance(state_dict, Mapping):
        hint = " (a path: pass torch.load(path, map_location='cpu'))" if isinstance(state_dict, (str, bytes)) else ""
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}{hint}")
    obj, used = checkpoint_weights(state_dict)
    if used:
        logger.info("load_unshared_state_dict: loading the checkpoint's %s", "/".join(used))
    bad = next((k for k, v in obj.items() if not isinstance(v, Tensor) and not k.endswith("_extra_state")), None)
    if bad is not None:
        ema = [k for k in EMA_KEYS if isinstance(obj.get(k), Mapping)]
        hint = f"; for its EMA weights pass state_dict[{ema[0]!r}]" if ema else ""
        raise ValueError(
            f"state_dict entry {bad!r} is of type {type(obj[bad]).__name__}, not a tensor: pass the model's weights "
            f"(a state_dict, or a training checkpoint holding one under {' / '.join(map(repr, WEIGHT_KEYS))}){hint}"
        )
    return strip_wrapper_prefixes(obj)


def _check_options(bare: nn.Module) -> None:
    """Refuses models whose shared tensors cannot be made from another checkpoint's members."""
    options: dict[str, Any] = {}
    for store in (m for m in bare.modules() if isinstance(m, SharedStore)):
        options.update({k: v for k, v in store.options.items() if v not in (None, False)})
    how = "load the checkpoint into the original model and sharify that (model.load_state_dict(state_dict); "
    if options.get("align"):
        raise ValueError(
            f"{type(bare).__name__} was sharified with align=True: its blocks' channels are in the order the weights "
            f"it was made from needed, which another checkpoint does not share; {how}sharify.sharify(model, "
            "align=True))"
        )
    for option, value in (("method", "basis"), ("init", "scaled")):
        if options.get(option) == value:
            raise ValueError(
                f"{type(bare).__name__} was sharified with {option}={value!r}, whose tensors are computed from the "
                f"weights it was made from (not an init of the members' tensors); {how}sharify.sharify(model, "
                f"{option}={value!r}))"
            )


def _fold_groups(bare: nn.Module, weights: dict[str, Tensor], init: str, strict: bool) -> dict[str, Tensor]:
    """Pops the members' tensors from ``weights`` (checking their shapes) and returns the shared ones by key."""
    paths = {id(m): p for p, m in bare.named_modules() if isinstance(m, SharedConvParams)}
    folded: dict[str, Tensor] = {}
    for key, (holder, members) in shared_groups(bare).items():
        names = ["weight"] + ([] if holder.bias is None else ["bias"])
        missing = [f"{m}.{n}" for m in members for n in names if f"{m}.{n}" not in weights]
        if missing and strict:
            raise KeyError(
                f"the checkpoint has no {missing[0]!r} (member of shared group {key!r}); is it a checkpoint of "
                "the original model? A sharified checkpoint loads with model.load_state_dict(...)"
            )
        for m in members:
            for n in names:
                want = tuple(getattr(holder, n).shape)
                got = weights.get(f"{m}.{n}")
                if got is not None and tuple(got.shape) != want:
                    raise ValueError(
                        f"checkpoint tensor {m}.{n!s} has shape {tuple(got.shape)}, but shared group {key!r} "
                        f"holds {want}: the checkpoint is of another architecture (or width) than the model"
                    )
        popped = {n: [weights.pop(f"{m}.{n}", None) for m in members] for n in names}
        if missing:  # strict=False: the group keeps its tensors
            continue
        biases = popped.get("bias") or [None] * len(members)
        weight, bias = initial_tensors([t for t in popped["weight"] if t is not None], biases, init)
        prefix = f"{paths.get(id(holder), f'{SHARED_STORE_NAME}.{key}')}."
        folded[prefix + "weight"] = weight
        if bias is not None:
            folded[prefix + "bias"] = bias
        folded.update(_refit_deltas(bare, members, popped, weight, bias))
    return folded


def _refit_deltas(
    bare: nn.Module, members: list[str], popped: dict[str, list[Tensor | None]], weight: Tensor, bias: Tensor | None
) -> dict[str, Tensor]:
    """Each member's low-rank delta (relaxed sharing) re-fitted to the loaded weights: the truncated SVD, at the
    member's rank, of what the new shared tensor misses of its checkpoint weight (see :mod:`sharify.rewrite.delta`)."""
    out: dict[str, Tensor] = {}
    biases = popped.get("bias") or [None] * len(members)
    for path, w, b in zip(members, popped["weight"], biases):
        rank = getattr(bare.get_submodule(path), "delta_rank", 0)
        if not rank or w is None:
            continue
        delta = svd_delta(MemberTarget.of(w, b, None), weight, bias, rank)
        out.update({f"{path}.delta_b": delta.up, f"{path}.delta_a": delta.down})
        if delta.bias is not None:
            out[f"{path}.delta_bias"] = delta.bias
    return out


def _check_fits(bare: nn.Module, weights: Mapping[str, Tensor], strict: bool) -> None:
    """What ``load_state_dict`` would refuse, checked before anything is copied."""
    own = bare.state_dict()
    for key, value in weights.items():
        if isinstance(value, Tensor) and isinstance(own.get(key), Tensor) and own[key].shape != value.shape:
            raise ValueError(
                f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model's has {tuple(own[key].shape)}; "
                "nothing was loaded: pass a checkpoint of this architecture"
            )
    if not strict:
        return
    # BatchNorm fills in a missing num_batches_tracked itself (checkpoints from before torch 0.4.1)
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(f"the checkpoint has no {missing[0]!r}{_more(missing)}; nothing was loaded")
    unexpected = [k for k in weights if k not in own]
    if unexpected:
        raise ValueError(
            f"the checkpoint has {unexpected[0]!r}, which {type(bare).__name__} has not{_more(unexpected)}; nothing "
            "was loaded: pass a checkpoint of this architecture, or strict=False to skip such keys"
        )


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def load_unshared_state_dict(
    shared: nn.Module, state_dict: Mapping[str, Any], *, init: str = "average", strict: bool = True
) -> Any:
    """Loads a checkpoint of the original model into its sharified version.

    The members' weights (and biases) of each group are combined by ``init`` into the shared tensor;
    all other keys load unchanged. A training checkpoint that holds the weights under
    ``"state_dict"``, ``"model"`` or ``"module"`` (timm's ``.pth.tar``; see :func:`checkpoint_weights`)
    is looked into, and a ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix on every key
    is removed first. Everything is checked before anything is copied: on an error the model is
    left as it was.

    Args:
        shared: A model returned by :func:`sharify.sharify` (or that model wrapped in DDP, DataParallel
            or ``torch.compile``: the state_dict is loaded into the model inside).
        state_dict: State dict of the original, unshared model (or a training checkpoint holding one).
        init: How to combine the members: ``"average"`` or ``"first"`` (``"random"`` ignores them). Members with a
            low-rank delta (``delta_rank``) get theirs re-fitted to the loaded weights, at their rank.
        strict: As in ``nn.Module.load_state_dict``: with ``False``, keys only one side has are
            skipped, and a group with a member missing keeps its current tensors. Shapes must match.

    Returns:
        ``load_state_dict``'s result (missing and unexpected keys).

    Raises:
        TypeError: ``shared`` is not a module, or ``state_dict`` is not a mapping.
        KeyError: With ``strict=True``, a key of the model (a member's weight, or any other) is
            missing from ``state_dict``.
        ValueError: ``shared`` has no shared convs, or was made with ``align=True``,
            ``method="basis"`` or ``init="scaled"`` (whose shared tensors belong to the weights they
            were made from: load the checkpoint before sharifying instead); a tensor's shape differs
            from the model's (the message names the key); a value is not a tensor; with
            ``strict=True``, ``state_dict`` has a key the model has not.

    Example:
        >>> import torchvision, sharify
        >>> original = torchvision.models.resnet18()
        >>> shared = sharify.sharify(torchvision.models.resnet18())
        >>> sharify.load_unshared_state_dict(shared, original.state_dict())
        <All keys matched successfully>
    """
    check_init(init)
    if not isinstance(shared, nn.Module):
        raise TypeError(f"load_unshared_state_dict expects a torch.nn.Module, got {type(shared).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    bare = unwrap(shared)[0]  # a DDP / DataParallel / compiled model: load into the model inside
    if not shared_groups(bare):
        raise ValueError(f"{type(shared).__name__} has no shared convs; use model.load_state_dict(state_dict) instead")
    _check_options(bare)
    remaining = _weights(state_dict)
    store = next((k for k in remaining if SHARED_STORE_NAME in k.split(".")), None)
    if store is not None:
        raise ValueError(
            f"state_dict is a sharified model's (it has {store!r}), not the original's: load it with "
            "shared.load_state_dict(state_dict)"
        )
    folded = _fold_groups(bare, remaining, init, strict)
    weights = {**remaining, **folded}
    _check_fits(bare, weights, strict)
    empty = meta_gap(bare, weights)
    if empty is not None:
        raise ValueError(f"{type(bare).__name__} is on the meta device and the checkpoint has no data for `{empty}`; "
                         "nothing was loaded: build the model on the CPU")  # fmt: skip
    return load_state(bare, weights, strict=strict)
