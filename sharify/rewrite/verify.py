"""Checking and repairing the ties of a sharified model: :func:`verify` and :func:`retie`.

How the ties are held (:mod:`sharify.layers`): each member conv keeps a plain reference to its
holder (``conv._sharify_holder``, not a registered submodule) and reads ``holder.weight`` at call
time; the holder itself is registered once, under ``model.sharify_shared`` (or, for a submodule
sharified in place, under it: ``det.backbone.body.sharify_shared``; every store at any depth is
checked, and a holder is looked up in the store of the deepest sharified module above its members).
Hence operations that replace the *tensors* inside the holders keep every tie, because the members
never held the tensors. Checked in ``tests/rewrite/test_verify.py``: ``load_state_dict(..., assign=True)``, meta-device
init + ``to_empty``, ``.to()`` under ``torch.__future__.set_overwrite_module_params_on_conversion(True)``
or ``set_swap_module_params_on_conversion(True)``, ``copy.deepcopy`` and pickling of the whole
model. What breaks ties is copying or replacing a part of the model without the rest:

* ``model.layer1 = copy.deepcopy(model.layer1)`` (or a pickled block put back): the copied members
  read a private copy of the holder, which is not in ``state_dict()`` or ``parameters()``;
* ``model.sharify_shared = copy.deepcopy(...)`` or another store: the members keep reading the old holders;
* ``del model.sharify_shared``, or a member conv used in another model: the holder is registered nowhere
  (:func:`retie` registers it in the module its members' stage is in, e.g. ``det.backbone.body``);
* ``conv.weight = holder.weight``: a conv tied by hand owns the shared tensor a second time.

:func:`verify` lists such problems in words; :func:`retie` repairs them (the registered holder wins:
it is what ``state_dict()`` saves and optimizers update) and raises :class:`~sharify.errors.TieError`
for what it cannot decide. Tensors the model ties itself (one conv module used by several blocks,
``b.conv.weight = a.conv.weight``) are not sharing groups and are not problems: :func:`sharify.save`
stores them once and :func:`sharify.load` ties them again (:mod:`sharify.io.aliases`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._wrappers import is_wrapper, unwrap
from ..errors import TieError, UnsupportedModelError
from ..layers import (
    SHARED_STORE_NAME,
    SharedConvParams,
    SharedStore,
    attach_to_holder,
    is_shared_conv,
    scoped_key,
    shared_stores,
)

__all__ = ["retie", "verify"]

logger = logging.getLogger(__name__)

_STORE = SHARED_STORE_NAME


@dataclass
class _Diagnosis:
    problems: list[str] = field(default_factory=list)
    unfixable: list[str] = field(default_factory=list)
    fixes: list[tuple[Callable[[], None], str]] = field(default_factory=list)


def _expected_shape(conv: nn.Module) -> tuple[int, ...] | None:
    if not isinstance(conv, nn.Conv2d):
        return None
    return (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)


def _same_values(a: SharedConvParams, b: SharedConvParams) -> bool:
    pairs = [(a.weight, b.weight), (a.bias, b.bias)]
    for x, y in pairs:
        if (x is None) != (y is None):
            return False
        if x is None or y is None:
            continue
        if x.shape != y.shape or x.is_meta or y.is_meta or x.device != y.device or not torch.equal(x, y):
            return False
    return True


def _compatible(holder: SharedConvParams, conv: nn.Module) -> bool:
    expected = _expected_shape(conv)
    return expected is None or tuple(holder.weight.shape) == expected


def _repoint(members: list[tuple[str, nn.Module]], holder: SharedConvParams) -> Callable[[], None]:
    def fix() -> None:
        for _, m in members:
            m.__dict__["_sharify_holder"] = holder

    return fix


def _rename(holder: SharedConvParams, key: str) -> Callable[[], None]:
    def fix() -> None:
        holder.key = key

    return fix


def _attach(conv: nn.Module, holder: SharedConvParams) -> Callable[[], None]:
    return lambda: attach_to_holder(conv, holder)


def _same_tensor(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (
        _storage(a) is not None
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _storage(t: Tensor) -> int | None:
    if t.is_meta or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr()


@dataclass(frozen=True)
class _Holder:
    scope: str  # path of the module the store is registered on ("" for the root)
    path: str  # the holder's path inside the store
    holder: SharedConvParams

    @property
    def key(self) -> str:
        """The group's key as seen from the model (see :func:`sharify.shared_groups`)."""
        return scoped_key(self.scope, self.path)

    @property
    def where(self) -> str:
        """The holder's module path in the model, e.g. ``backbone.body.sharify_shared.layer1.conv2``."""
        return _where(self.scope, self.path)


def _where(scope: str, path: str) -> str:
    return f"{scope + '.' if scope else ''}{_STORE}.{path}"


def _under(path: str, scope: str) -> bool:
    return not scope or path.startswith(scope + ".")


def _diagnose(model: nn.Module) -> _Diagnosis:
    d = _Diagnosis()
    for path, module in model.named_modules():
        store = module._modules.get(_STORE)
        if store is not None and not isinstance(store, SharedStore):
            name = f"{path}.{_STORE}" if path else _STORE
            msg = f"`{name}` is not sharify's store of shared tensors (it is {type(store).__name__})"
            d.problems.append(msg)
            d.unfixable.append(msg)
    if d.problems:
        return d

    registered: dict[str, _Holder] = {}  # by key as seen from the model (scope-prefixed)
    for scope, store in shared_stores(model).items():
        for path, module in store.named_modules():
            if isinstance(module, SharedConvParams):
                entry = _Holder(scope, path, module)
                registered.setdefault(scoped_key(scope, path), entry)
                if module.key != path:
                    d.problems.append(f"the holder registered at `{entry.where}` says its key is `{module.key}`")
                    d.fixes.append((_rename(module, path), f"set the key of `{entry.where}` to `{path}`"))
    _check_members(model, registered, d)
    _check_aliases(model, registered, d)
    return d


def _registered_for(paths: list[str], key: str, registered: dict[str, _Holder], scopes: list[str]) -> _Holder | None:
    """The registered holder of ``key`` in the deepest store whose module contains every one of ``paths``."""
    for scope in scopes:
        entry = registered.get(scoped_key(scope, key))
        if entry is not None and entry.scope == scope and all(_under(p, scope) for p in paths):
            return entry
    return None


def _home(paths: list[str], holder: SharedConvParams, scopes: list[str]) -> str:
    """Where an unregistered holder belongs: the module its members' stage is in, else the deepest store above them."""
    parts = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    stage = holder.stage.split(".") if holder.stage else []
    if len(paths) > 1 and common[len(common) - len(stage) :] == stage:
        return ".".join(common[: len(common) - len(stage)])
    return next((s for s in scopes if all(_under(p, s) for p in paths)), "")


def _register(model: nn.Module, scope: str, holder: SharedConvParams) -> Callable[[], None]:
    def fix() -> None:
        owner = model.get_submodule(scope)
        current = owner._modules.get(_STORE)
        if current is None:
            current = SharedStore()
            owner.add_module(_STORE, current)
        assert isinstance(current, SharedStore)  # _diagnose refuses any other module under that name
        current.add_holder(holder)

    return fix


_Members = list[tuple[str, nn.Module]]


def _readers(model: nn.Module) -> list[tuple[SharedConvParams, _Members]]:
    """The member convs of ``model`` (with their paths), grouped by the holder object they read."""
    readers: dict[int, tuple[SharedConvParams, _Members]] = {}
    for path, module in model.named_modules():
        if is_shared_conv(module):
            holder = module._sharify_holder
            readers.setdefault(id(holder), (holder, []))[1].append((path, module))
    return list(readers.values())


def _check_shapes(holder: SharedConvParams, members: _Members, d: _Diagnosis) -> None:
    """Every member must fit the shape of the holder it reads (not fixable)."""
    bad_shape = [p for p, m in members if not _compatible(holder, m)]
    if bad_shape:
        want, have = _expected_shape(members[0][1]), tuple(holder.weight.shape)
        msg = f"`{bad_shape[0]}` expects a weight of shape {want} but its holder `{holder.key}` has {have}"
        d.problems.append(msg)
        d.unfixable.append(msg)


def _check_copy(holder: SharedConvParams, members: _Members, target: _Holder, d: _Diagnosis) -> None:
    """``members`` read ``holder``, a copy of the registered ``target``: re-pointed to ``target`` if they fit it."""
    names = ", ".join(f"`{p}`" for p, _ in members)
    d.problems.append(
        f"{names} read a copy of shared group `{target.key}`, not the holder registered in the model "
        f"(`{target.where}`): forward uses the copy while state_dict(), parameters() and optimizers "
        "use the registered one (typical after `model.block = copy.deepcopy(model.block)` or replacing "
        f"`model.{_STORE}`)"
    )
    if any(not _compatible(target.holder, m) for _, m in members):
        d.unfixable.append(f"the registered `{target.key}` does not fit {names}")
        return
    differ = "" if _same_values(holder, target.holder) else " (the copy's values differed; kept the registered ones)"
    message = f"re-pointed {names} to the registered holder `{target.key}`{differ}"
    d.fixes.append((_repoint(members, target.holder), message))


def _check_members(model: nn.Module, registered: dict[str, _Holder], d: _Diagnosis) -> None:
    """Every member conv must read the holder registered under its key.

    Members that read another holder either read a copy of a registered one (:func:`_check_copy`) or an orphan,
    which is registered in the module its members' stage is in (once: other copies of it are re-pointed to it).
    """
    registered_ids = {id(e.holder) for e in registered.values()}
    stores = shared_stores(model)
    scopes = sorted(stores, key=lambda s: (-s.count(".") - bool(s), s))  # deepest first, the root last
    orphans: dict[str, SharedConvParams] = {}  # scoped key -> the orphan that will be registered
    for holder, members in _readers(model):
        _check_shapes(holder, members, d)
        if id(holder) in registered_ids:
            continue
        paths = [p for p, _ in members]
        target = _registered_for(paths, holder.key, registered, scopes)
        if target is not None:
            _check_copy(holder, members, target, d)
            continue
        names = ", ".join(f"`{p}`" for p in paths)
        home = _home(paths, holder, scopes)
        where = _where(home, holder.key)
        d.problems.append(
            f"{names} read shared group `{holder.key}`, whose holder is not registered in the model (no "
            f"`{where}`): its tensors are missing from state_dict() and parameters() (typical for a "
            f"copied block used on its own, a conv moved into another model, or after deleting `model.{_STORE}`)"
        )
        first = orphans.get(scoped_key(home, holder.key))
        if first is not None:
            if not _same_values(first, holder):
                d.unfixable.append(f"two different copies of holder `{holder.key}` are read by the model's convs")
                continue
            d.fixes.append((_repoint(members, first), f"re-pointed {names} to the same holder `{holder.key}`"))
            continue
        mine = [e.path for e in registered.values() if e.scope == home]
        clash = next((k for k in mine if k.startswith(holder.key + ".") or holder.key.startswith(k + ".")), None)
        if clash is not None:
            d.unfixable.append(f"holder `{holder.key}` cannot be registered next to `{_where(home, clash)}`")
            continue
        orphans[scoped_key(home, holder.key)] = holder
        created = " (created the store; the sharing options it recorded are unknown)" if home not in stores else ""
        d.fixes.append((_register(model, home, holder), f"registered holder `{holder.key}` as `{where}`{created}"))


def _check_aliases(model: nn.Module, registered: dict[str, _Holder], d: _Diagnosis) -> None:
    """No other state_dict entry may share memory with a holder's tensors."""
    owners: dict[int, tuple[_Holder, str]] = {}
    for entry in registered.values():
        for attr in ("weight", "bias"):
            t = getattr(entry.holder, attr)
            if isinstance(t, Tensor) and _storage(t) is not None:
                owners[_storage(t)] = (entry, attr)  # type: ignore[index]
    if not owners:
        return
    modules = dict(model.named_modules())
    seen: set[str] = set()
    for sd_key, value in model.state_dict(keep_vars=True).items():
        ptr = _storage(value) if isinstance(value, Tensor) else None
        if ptr is None or ptr not in owners:
            continue
        entry, attr = owners[ptr]
        owner_key = f"{entry.where}.{attr}"
        if sd_key == owner_key:
            continue
        holder = entry.holder
        mod_path, _, name = sd_key.rpartition(".")
        conv = modules.get(mod_path)
        if isinstance(conv, nn.Conv2d) and not is_shared_conv(conv) and name == attr:
            if mod_path in seen:
                continue
            seen.add(mod_path)
            d.problems.append(
                f"`{mod_path}` has its own {name} that is the shared tensor `{owner_key}` (tied by "
                "assignment): state_dict() holds it twice and safetensors refuses to save it"
            )
            tied = _same_tensor(conv.weight, holder.weight) and _same_tensor(conv.bias, holder.bias)
            if tied and _compatible(holder, conv):
                d.fixes.append((_attach(conv, holder), f"made `{mod_path}` a member of `{entry.key}` again"))
            else:
                d.unfixable.append(f"`{mod_path}`'s weight and bias are not exactly those of holder `{entry.key}`")
            continue
        msg = (
            f"`{sd_key}` shares memory with the shared tensor `{owner_key}`; give one of them its own copy "
            "(e.g. model.<path> = nn.Parameter(tensor.clone()))"
        )
        d.problems.append(msg)
        d.unfixable.append(msg)


def verify(model: nn.Module) -> list[str]:
    """Checks that every shared conv reads the holder registered in the model, and nothing else aliases it.

    Operations that replace the tensors of the whole model keep every tie, so ``verify`` finds nothing
    after them: ``load_state_dict(..., assign=True)``, meta-device init + ``to_empty``, ``.to()`` (also
    with ``set_overwrite_module_params_on_conversion``), ``copy.deepcopy`` or pickling the whole model.
    Member convs hold no tensors of their own; they read the registered holder's at call time. What
    it finds is surgery on a part of the model (see the module docstring). DDP, DataParallel and
    ``torch.compile`` wrappers are looked through.

    Args:
        model: A sharified model (an unshared one has nothing to check).

    Returns:
        One readable sentence per problem; empty when the sharing is intact.

    Example:
        >>> import copy, torchvision, sharify
        >>> shared = sharify.sharify(torchvision.models.resnet18())
        >>> sharify.verify(shared)
        []
        >>> shared.layer1 = copy.deepcopy(shared.layer1)   # the copy reads a private copy of the holder
        >>> len(sharify.verify(shared)), sharify.retie(shared) != [], sharify.verify(shared)
        (1, True, [])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"verify expects a torch.nn.Module, got {type(model).__name__}")
    return _diagnose(unwrap(model)[0]).problems


def retie(model: nn.Module) -> list[str]:
    """Repairs the problems :func:`verify` finds, in place; all or nothing.

    There is nothing to repair after ``load_state_dict(..., assign=True)``, meta-device init +
    ``to_empty`` or ``.to()``: member convs read the registered holder at call time, so the ties
    survive by construction and ``retie`` returns ``[]`` (checked in ``tests/rewrite/test_verify.py``). It is
    for surgery that copies or replaces a part of the model (see the module docstring).

    Members that read a copy of a holder are pointed at the registered holder of the same key (its
    values win: they are what ``state_dict()`` saves and optimizers update); holders read but
    registered nowhere are registered in ``model.sharify_shared`` (created if missing); a conv tied
    to a holder's tensors by assignment becomes a member again. Parameters registered by this call
    are new to optimizers made before it.

    Args:
        model: The bare model (not a DDP/DataParallel/``torch.compile`` wrapper: retie before wrapping).

    Returns:
        What was repaired, one sentence per repair (empty when nothing was needed).

    Raises:
        TieError: A problem has no unambiguous repair (shapes that do not fit, two different copies of
            one holder, a holder tensor aliased by an unrelated tensor); nothing is modified.
        UnsupportedModelError: ``model`` is a wrapper.

    Example:
        >>> import torch, torchvision, sharify
        >>> with torch.device("meta"):
        ...     shared = sharify.sharify(torchvision.models.resnet18())
        >>> shared = shared.to_empty(device="cpu")   # ties survive to_empty: nothing to repair
        >>> sharify.retie(shared)
        []
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"retie expects a torch.nn.Module, got {type(model).__name__}")
    if is_wrapper(model):
        raise UnsupportedModelError(
            f"got a {type(model).__name__} wrapper; retie the bare model before wrapping it (the wrapper has "
            "already captured the parameters)"
        )
    d = _diagnose(model)
    if d.unfixable:
        raise TieError(f"cannot repair the sharing of {type(model).__name__}: " + "; ".join(d.unfixable))
    for fix, message in d.fixes:
        fix()
        logger.info("retie: %s", message)
    left = _diagnose(model).problems
    if left:  # pragma: no cover - every fixable problem is fixed above
        raise TieError(f"retie left problems in {type(model).__name__}: " + "; ".join(left))
    return [message for _, message in d.fixes]
