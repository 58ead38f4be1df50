"""Loading an original (unshared) checkpoint into a sharified model.

A sharified model's state_dict has one key per shared tensor (``sharify_shared.<key>.weight``) where
the original had one per member conv (``layer1.0.conv2.weight``, ...). :func:`load_unshared_state_dict`
folds the members' tensors of an original checkpoint into the shared tensor with an init strategy
(``"average"`` by default: the paper's averaged init of a pretrained model) and loads the rest as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ._wrappers import unwrap
from .init import check_init, initial_tensors
from .layers import holder_paths, shared_groups, shared_stores

__all__ = ["load_unshared_state_dict"]


def _strip_prefix(
    state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")
) -> dict[str, Any]:
    out = dict(state_dict)
    for prefix in prefixes:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def load_unshared_state_dict(
    shared: nn.Module, state_dict: Mapping[str, Tensor], *, init: str = "average", strict: bool = True
) -> Any:
    """Loads a checkpoint of the original model into its sharified version.

    The members' weights (and biases) of each group are combined by ``init`` into the shared tensor;
    all other keys load unchanged. A ``module.`` prefix (DDP) or ``_orig_mod.`` prefix
    (``torch.compile``) on every key is removed first.

    Args:
        shared: A model returned by :func:`sharify.sharify` (or that model wrapped in DDP, DataParallel
            or ``torch.compile``: the state_dict is loaded into the model inside).
        state_dict: State dict of the original, unshared model.
        init: How to combine the members: ``"average"`` or ``"first"`` (``"random"`` ignores them).
        strict: As in ``nn.Module.load_state_dict``.

    Returns:
        ``load_state_dict``'s result (missing and unexpected keys).

    Raises:
        KeyError: With ``strict=True``, a member's weight is missing from ``state_dict``.
        ValueError: ``shared`` has no shared convs, or was made with ``align=True`` (whose channel order
            belongs to the weights it was made from: load the checkpoint before sharifying instead).

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
    bare = unwrap(shared)[0]  # a DDP / DataParallel / compiled model: load into the model inside
    groups, holders = shared_groups(bare), holder_paths(bare)
    if not groups:
        raise ValueError(f"{type(shared).__name__} has no shared convs; use model.load_state_dict(state_dict) instead")
    if any(store.options.get("align") for store in shared_stores(bare).values()):
        raise ValueError(
            f"{type(bare).__name__} was sharified with align=True: its blocks' channels are in the order the weights "
            "it was made from needed, which another checkpoint does not share; load the checkpoint into the original "
            "model and sharify that (model.load_state_dict(state_dict); sharify.sharify(model, align=True))"
        )
    remaining = _strip_prefix(state_dict)
    folded: dict[str, Tensor] = {}
    for key, (holder, members) in groups.items():
        names = ["weight"] + ([] if holder.bias is None else ["bias"])
        missing = [f"{m}.{n}" for m in members for n in names if f"{m}.{n}" not in remaining]
        if missing:
            if strict:
                raise KeyError(
                    f"the checkpoint has no {missing[0]!r} (member of shared group {key!r}); is it a checkpoint of "
                    "the original model? A sharified checkpoint loads with model.load_state_dict(...)"
                )
            for m in members:
                for n in names:
                    remaining.pop(f"{m}.{n}", None)
            continue
        weights = [remaining.pop(f"{m}.weight") for m in members]
        biases = [remaining.pop(f"{m}.bias") if holder.bias is not None else None for m in members]
        weight, bias = initial_tensors(weights, biases, init)
        prefix = f"{holders[key]}."
        folded[prefix + "weight"] = weight
        if bias is not None:
            folded[prefix + "bias"] = bias
    return bare.load_state_dict({**remaining, **folded}, strict=strict)
