"""Optimizer and schedule for a (sharified) model, built from timm's components.

Weight decay: :func:`param_groups` hands ``model.named_parameters()`` to timm, which yields each
shared tensor once, under its own name ``sharify_shared.<key>.weight``; conv weights (shared or
not) are decayed, 1-d tensors (biases, norms) are not.

Layer decay: timm assigns layer ids with the model's ``group_matcher`` regexes (``^layer(\\d+)``,
``^stages\\.(\\d+)`` ...) or, without one, by chunking parameters in registration order. Neither
knows the store of shared tensors: its names match no regex, and timm gives *unmatched* names the
largest id, i.e. the head's: a shared weight of the first stage would be trained at the full
learning rate while the unshared layers around it are decayed. (Without a ``group_matcher`` the
store, registered last, lands in the last trunk chunk.) :func:`layer_ids` fixes this by naming each
shared tensor after its **first member** (``layer1.0.conv2.weight``) when asking timm for the id,
so the shared tensor gets the id of the earliest layer that uses it -- the smallest learning-rate
scale among its members: a tensor whose gradient is the sum over several layers is never updated
faster than any of those layers would be on its own. The optimizer still sees the tensor once,
under its real name.

Schedule: timm's ``CosineLRScheduler`` stepped per optimizer update, with linear warm-up; it applies
each group's ``lr_scale`` (layer decay).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers import SHARED_STORE_NAME, holder_paths, is_shared_conv, shared_groups

__all__ = ["create_optimizer", "create_scheduler", "layer_ids", "param_groups"]


def _shared_aliases(model: nn.Module) -> dict[str, str]:
    """Shared parameter name -> the first member's equivalent name."""
    aliases = {}
    paths = holder_paths(model)  # a store of a submodule sharified in place: under that submodule
    for key, (holder, members) in shared_groups(model).items():
        if not members:
            continue
        for pname, _ in holder.named_parameters(recurse=False):
            aliases[f"{paths[key]}.{pname}"] = f"{members[0]}.{pname}"
    return aliases


def _execution_order(model: nn.Module, aliases: dict[str, str]) -> list[str]:
    """Parameter names in module order, each shared tensor placed where its first member is."""
    by_member: dict[str, list[str]] = {alias.rsplit(".", 1)[0]: [] for alias in aliases.values()}
    for name, alias in aliases.items():
        by_member[alias.rsplit(".", 1)[0]].append(name)
    seen = set(aliases)
    order = []
    for path, module in model.named_modules():
        if any(part == SHARED_STORE_NAME for part in path.split(".")):
            continue
        if is_shared_conv(module):
            order.extend(by_member.get(path, []))
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{path}.{pname}" if path else pname
            if full not in seen:
                order.append(full)
                seen.add(full)
    return order


def layer_ids(model: nn.Module, *, coarse: bool = False) -> dict[str, int]:
    """Layer id of every parameter for layer-wise lr decay (higher = closer to the head).

    Uses the model's ``group_matcher`` when it has one (timm models), else timm's
    ``auto_group_layers``; shared tensors get the id of their first member (module docstring).
    """
    from timm.models._manipulate import group_with_matcher
    from timm.optim._param_groups import auto_group_layers

    aliases = _shared_aliases(model)
    names = [n for n, p in model.named_parameters()]
    if hasattr(model, "group_matcher"):
        lookup = [aliases.get(n, n) for n in names]
        matcher = model.group_matcher(coarse=coarse)  # type: ignore[operator]
        ids = group_with_matcher(((n, None) for n in lookup), matcher, reverse=True)
        return {n: ids[aliases.get(n, n)] for n in names}

    class _Ordered:  # auto_group_layers reads named_parameters() order and pretrained_cfg
        pretrained_cfg = getattr(model, "pretrained_cfg", None) or {"classifier": _head_prefix(model)}

        def named_parameters(self) -> Any:
            params = dict(model.named_parameters())
            return ((n, params[n]) for n in _execution_order(model, aliases))

    return dict(auto_group_layers(_Ordered()))


def _head_prefix(model: nn.Module) -> str | None:
    from .model import classifier

    found = classifier(model)
    return found[0] if found else None


class _Grouping:
    """What timm's ``param_groups_layer_decay`` reads from a model, with our layer ids."""

    def __init__(self, model: nn.Module, ids: dict[str, int]) -> None:
        self._model, self._ids = model, ids

    def named_parameters(self) -> Any:
        return self._model.named_parameters()

    def group_matcher(self, coarse: bool = False) -> Any:
        return lambda name: (self._ids[name],)


def param_groups(
    model: nn.Module, *, weight_decay: float = 0.0, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups (timm's), each shared tensor once, with shared-aware layer decay.

    Args:
        model: The (sharified or plain) model.
        weight_decay: Decay of weights; 1-d tensors and ``model.no_weight_decay()`` names get none.
        layer_decay: Layer-wise lr decay factor (groups carry ``lr_scale``), or ``None``.

    Example:
        >>> import torchvision, sharify
        >>> from timm.optim import create_optimizer_v2
        >>> model = sharify.sharify(torchvision.models.resnet18())
        >>> opt = create_optimizer_v2(param_groups(model, weight_decay=1e-4, layer_decay=0.8), "sgd", lr=0.1)
        >>> sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
        True
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay: set[str] = getattr(model, "no_weight_decay", lambda: set())()
    if layer_decay is None:
        return list(param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay))
    grouping = _Grouping(model, layer_ids(model))
    return list(
        param_groups_layer_decay(
            grouping,  # type: ignore[arg-type]
            weight_decay=weight_decay,
            layer_decay=layer_decay,
            no_weight_decay_list=no_decay,
        )
    )


def create_optimizer(
    model: nn.Module,
    *,
    opt: str = "sgd",
    lr: float = 0.01,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` on :func:`param_groups` (any timm optimizer name: sgd, adamw, ...)."""
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)
    try:
        return create_optimizer_v2(groups, opt=opt, lr=lr, momentum=momentum)
    except ValueError as exc:  # timm: "Optimizer x not found in registry"
        raise ValueError(f"--opt {opt}: {exc}; see timm.optim.list_optimizers() for the names") from exc


def create_scheduler(
    optimizer: torch.optim.Optimizer, *, total_updates: int, warmup_updates: int = 0, min_lr: float = 0.0
) -> Any:
    """Cosine schedule over ``total_updates`` optimizer steps with linear warm-up from ``lr/100``.

    Call ``scheduler.step_update(num_updates)`` after every optimizer step.
    """
    from timm.scheduler import CosineLRScheduler

    base_lr = max(g["lr"] for g in optimizer.param_groups)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_updates - warmup_updates),
        lr_min=min_lr,
        warmup_t=warmup_updates,
        warmup_lr_init=base_lr / 100 if warmup_updates else 0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
