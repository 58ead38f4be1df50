"""Filter-basis sharing (Kang et al., *Deeply Shared Filter Bases*).

With ``method="basis"`` each member conv ``C_in -> C_out`` (3x3) becomes a :class:`BasisConv2d`::

    concat(unique 3x3 conv C_in -> u, shared 3x3 conv C_in -> s) -> BatchNorm(s + u) -> 1x1 conv -> C_out

The shared basis is an ordinary shared conv (its weight owned once by the group's holder, exactly like
whole-conv sharing); the unique basis, BatchNorm and 1x1 coefficients belong to the block. Viewing a
conv as the matrix ``W`` (``C_out x C_in*9``), the block computes ``W ~ A [B_u; B_s]``: filters are
combinations of basis filters.

Initialisation:

* ``"orthogonal"`` (the paper's): shared bases orthogonal (``nn.init.orthogonal_``), the rest
  PyTorch's default init; meant for training from scratch or long fine-tuning.
* ``"svd"``: from the members' current (pretrained) weights. The shared basis is the top-``s`` right
  singular vectors of all members' filters stacked; each member's unique basis the top-``u`` right
  singular vectors of what the shared basis misses of it; its coefficients the projection of its
  filters on both bases. BatchNorm starts as the identity in eval mode, so the converted model
  approximates the original before any fine-tuning, exactly once ``u`` reaches the layer's rank.

Training adds ``lambda_R * orthogonality_loss(model)`` (the paper uses ``lambda_R = 10``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import shared_groups

__all__ = ["BasisConv2d", "orthogonality_loss", "svd_bases"]


class BasisConv2d(nn.Module):
    """A conv computed as ``coeff(norm(concat(unique(x), shared(x))))``.

    Args:
        conv: The conv it replaces (geometry, dtype and device are copied; weights are not).
        shared_rank: Filters in the shared basis.
        unique_rank: Filters in this block's own basis.
    """

    def __init__(self, conv: nn.Conv2d, shared_rank: int, unique_rank: int) -> None:
        super().__init__()
        device, dtype = conv.weight.device, conv.weight.dtype
        s, u = shared_rank, unique_rank

        def basis_conv(out_channels: int) -> nn.Conv2d:
            geometry: dict[str, Any] = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
            return nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, **geometry, bias=False,  # type: ignore[arg-type]
                             padding_mode=conv.padding_mode, device=device, dtype=dtype)  # fmt: skip

        self.unique = basis_conv(u)
        self.shared = basis_conv(s)
        self.norm = nn.BatchNorm2d(s + u, device=device, dtype=dtype)
        self.coeff = nn.Conv2d(s + u, conv.out_channels, 1, bias=conv.bias is not None, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.coeff(self.norm(torch.cat([self.unique(x), self.shared(x)], 1)))

    def effective_weight(self) -> Tensor:
        """The dense conv weight this module computes in eval mode (BatchNorm folded, its shift ignored)."""
        with torch.no_grad():
            basis = torch.cat([self.unique.weight, self.shared.weight]).flatten(1)
            var = self.norm.running_var
            assert isinstance(var, Tensor)
            scale = self.norm.weight / torch.sqrt(var + self.norm.eps)
            w = self.coeff.weight.flatten(1) @ (scale[:, None] * basis)
        return w.view(self.coeff.out_channels, *self.unique.weight.shape[1:])

    def set_identity_norm(self) -> None:
        """Makes the BatchNorm the identity in eval mode (running mean 0, variance ``1 - eps``)."""
        with torch.no_grad():
            self.norm.reset_parameters()
            self.norm.running_var.fill_(1 - self.norm.eps)  # type: ignore[union-attr]


def _top_right_singular(m: Tensor, k: int, avoid: Tensor | None = None) -> Tensor:
    """``k`` orthonormal rows: the top right singular vectors of ``m``, completed (orthogonally to
    them and to the rows of ``avoid``) when ``m`` has fewer than ``k`` rows."""
    vh = torch.linalg.svd(m, full_matrices=False)[2][:k]
    if vh.shape[0] >= k:
        return vh
    known = vh if avoid is None else torch.cat([vh, avoid])
    g = torch.Generator(device="cpu").manual_seed(0)
    extra = torch.randn(k - vh.shape[0], m.shape[1], generator=g, dtype=m.dtype).to(m.device)
    extra = extra - (extra @ known.T) @ known
    return torch.cat([vh, torch.linalg.qr(extra.T)[0].T])


def svd_bases(
    weights: Sequence[Tensor], shared_rank: int, unique_rank: int
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Shared basis, unique bases and coefficients approximating ``weights`` (``init="svd"``).

    Args:
        weights: The members' conv weights, each ``(C_out, C_in, kh, kw)``.
        shared_rank: ``s``, rows of the shared basis.
        unique_rank: ``u``, rows of each unique basis.

    Returns:
        ``(shared (s, d), [unique_i (u, d)], [coeff_i (C_out, u + s)])`` with ``d = C_in * kh * kw``,
        coefficient columns ordered unique first, as :class:`BasisConv2d` concatenates. The rows of
        each basis are orthonormal; coefficients are the least-squares fit of the member's filters.
    """
    mats = [w.detach().flatten(1).double() for w in weights]
    shared = _top_right_singular(torch.cat(mats), shared_rank)
    uniques, coeffs = [], []
    for w in mats:
        residual = w - (w @ shared.T) @ shared  # what the shared basis misses of this member
        unique = _top_right_singular(residual, unique_rank, avoid=shared)
        basis = torch.cat([unique, shared])
        uniques.append(unique)
        coeffs.append(torch.linalg.lstsq(basis.T, w.T).solution.T)
    dtype = weights[0].dtype
    return shared.to(dtype), [u.to(dtype) for u in uniques], [c.to(dtype) for c in coeffs]


def orthogonality_loss(model: nn.Module) -> Tensor:
    """The Deeply-Shared-Filter-Bases regulariser: how far the shared bases are from orthonormal.

    For each shared basis ``B`` (its filters flattened as rows), the mean over filter pairs of
    ``(B B^T - I)^2``; averaged over the model's shared bases. Differentiable; ``0`` for orthonormal
    bases and for models without bases. Add ``lambda_R * orthogonality_loss(model)`` to the loss
    (the paper's ``lambda_R = 10``). A DDP / DataParallel / ``torch.compile`` wrapper is looked through,
    so ``10 * orthogonality_loss(ddp_model)`` regularises the wrapped model's bases.

    Example:
        >>> import torchvision, sharify
        >>> m = sharify.sharify(torchvision.models.resnet34(), preset="dsfb-basis", shared_rank=48, unique_rank=1)
        >>> sharify.orthogonality_loss(m).item() < 1e-10
        True

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"orthogonality_loss expects a torch.nn.Module (the model), got {type(model).__name__}")
    terms = []
    for holder, _ in shared_groups(model).values():
        if getattr(holder, "method", "share") != "basis":
            continue
        b = holder.weight.flatten(1)
        eye = torch.eye(b.shape[0], device=b.device, dtype=b.dtype)
        terms.append((b @ b.T - eye).square().mean())
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(terms).mean()
