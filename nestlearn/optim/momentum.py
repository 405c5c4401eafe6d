"""Momentum as an associative memory, with a preconditioner (Eqs. 33, 46-47) or a delta rule (Eqs. 48-49).

What this is: `PreconditionedMomentum` and `DeltaMomentum`, drop-in `torch.optim` optimizers.

    preconditioned (Eq. 47):  m <- alpha m - lr P(g),                 W <- W + m
    delta (Eq. 49):           m <- m (alpha I - zeta ĝ^T ĝ) - lr P(g),  W <- W + m

The momentum is a matrix memory that compresses gradients: Eq. 33 is GD with step `lr` on the dot-product
objective `<m, g>` plus an L2 pull towards the previous momentum (decay alpha); Eq. 47 stores `P(g)` instead
of `g`; Eq. 49 replaces the dot product by the L2 (delta-rule) objective `||m g^T - P||^2`, which adds the
gradient-dependent decay `m ĝ^T ĝ` (forget what the new gradient overwrites). Preconditioners `P`: "identity"
(Eq. 33, = momentum SGD), "diagonal" (Adam's second moment: `g / (sqrt(v̂) + eps)`) and "kronecker" (two-sided
Shampoo factors `L^{-1/4} g R^{-1/4}` of 2-D gradients, refreshed every `precond_every` steps, grafted to the
norm of g; other shapes fall back to "diagonal"). A parameter of any shape is treated as a matrix
`[shape[0], rest]` (a vector as one row). `weight_decay` is decoupled (`W <- W (1 - lr wd)`).
`normalize=True` (default) uses `ĝ = g / ||g||_F`, so the decay matrix stays in `[alpha - zeta, alpha]`;
`normalize=False, zeta=1` is Eq. 49 as printed, unstable once `||g||` exceeds about 1 (docs/decisions.md).
What it is not: deep (MLP) momentum (`deep.py`) or Muon (`muon.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .base import MemoryOptimizer, check_lr, check_positive, check_unit

PRECONDITIONERS = ("identity", "diagonal", "kronecker")


class PreconditionedMomentum(MemoryOptimizer):
    """Eqs. 33 / 46-47. With `precond="identity"` this is `torch.optim.SGD(momentum=alpha)` exactly at a constant
    learning rate. Under a schedule they differ: Eq. 33's momentum stores lr-scaled gradients (`m <- alpha m - lr_t g`,
    `W <- W + m`), while SGD keeps `m <- alpha m + g` and scales the whole buffer by the current rate."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        *,
        precond: str = "identity",
        beta2: float = 0.999,
        eps: float = 1e-8,
        precond_every: int = 10,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, _defaults(lr, momentum, precond, beta2, eps, precond_every, weight_decay))

    def core(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["step"] = 0
            state["m"] = torch.zeros_like(p)
        state["step"] += 1
        m = state["m"]
        self._decay(m, g, group)
        m.add_(precondition(g, state, group), alpha=-group["lr"])  # Eq. 47
        _apply(p, m, group)

    def _decay(self, m: Tensor, g: Tensor, group: dict[str, Any]) -> None:
        """`m <- alpha m` (the forget gate of Eq. 47)."""
        m.mul_(group["momentum"])


class DeltaMomentum(PreconditionedMomentum):
    """Eqs. 48-49: momentum with the gradient-dependent decay `m ĝ^T ĝ`. `zeta=0` is `PreconditionedMomentum`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        *,
        zeta: float = 0.5,
        normalize: bool = True,
        precond: str = "identity",
        beta2: float = 0.999,
        eps: float = 1e-8,
        precond_every: int = 10,
        weight_decay: float = 0.0,
    ) -> None:
        check_lr(zeta, "zeta")
        defaults = _defaults(lr, momentum, precond, beta2, eps, precond_every, weight_decay)
        MemoryOptimizer.__init__(self, params, {**defaults, "zeta": zeta, "normalize": normalize})

    def _decay(self, m: Tensor, g: Tensor, group: dict[str, Any]) -> None:
        """`m <- m (alpha I - zeta ĝ^T ĝ)` (Eq. 49)."""
        gh = g / g.norm().clamp_min(group["eps"]) if group["normalize"] else g
        forget = _right_gram(_as_matrix(m), _as_matrix(gh))  # m ĝ^T ĝ, from the momentum before the decay
        m.mul_(group["momentum"]).sub_(forget.view_as(m), alpha=group["zeta"])


def precondition(g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """`P(g)` for the group's preconditioner; its statistics live in `state` (`step` already counts this one)."""
    kind = group["precond"]
    if kind == "identity":
        return g
    if kind == "kronecker" and g.dim() == 2:
        return _kronecker(g, state, group)
    return _diagonal(g, state, group)


def _diagonal(g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """Adam's second moment: `v <- b2 v + (1 - b2) g^2`, `g / (sqrt(v / (1 - b2^t)) + eps)`."""
    b2 = group["beta2"]
    v = state.setdefault("v", torch.zeros_like(g))
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    return g / ((v / (1 - b2 ** state["step"])).sqrt() + group["eps"])


def _kronecker(g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """Two-sided Shampoo: `L <- b2 L + (1-b2) g g^T`, `R <- b2 R + (1-b2) g^T g`, `L^{-1/4} g R^{-1/4}` grafted to
    `||g||` (the inverse roots are recomputed every `precond_every` steps, by eigendecomposition in float64)."""
    b2 = group["beta2"]
    left = state.setdefault("L", torch.zeros(g.shape[0], g.shape[0], dtype=g.dtype, device=g.device))
    right = state.setdefault("R", torch.zeros(g.shape[1], g.shape[1], dtype=g.dtype, device=g.device))
    left.mul_(b2).add_(g @ g.T, alpha=1 - b2)
    right.mul_(b2).add_(g.T @ g, alpha=1 - b2)
    if "L_root" not in state or (state["step"] - 1) % group["precond_every"] == 0:
        state["L_root"] = _inverse_root(left, group["eps"]).to(g.dtype)
        state["R_root"] = _inverse_root(right, group["eps"]).to(g.dtype)
    u = state["L_root"] @ g @ state["R_root"]
    return u * (g.norm() / u.norm().clamp_min(group["eps"]))


def _inverse_root(a: Tensor, eps: float) -> Tensor:
    """`(A + eps' I)^{-1/4}` of a symmetric PSD matrix, eps' relative to its largest eigenvalue."""
    vals, vecs = torch.linalg.eigh(a.double())
    vals = vals.clamp_min(0) + max(float(vals.max()), 1e-30) * 1e-6 + eps
    return (vecs * vals.pow(-0.25)) @ vecs.T


def _apply(p: Tensor, m: Tensor, group: dict[str, Any]) -> None:
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(m)


def _as_matrix(x: Tensor) -> Tensor:
    """`[shape[0], rest]`; a vector is one row, a scalar a 1 x 1 matrix."""
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def _right_gram(m: Tensor, g: Tensor) -> Tensor:
    """`m g^T g` for `m, g [r, n]`, in the cheaper association."""
    return (m @ g.T) @ g if m.shape[0] <= m.shape[1] else m @ (g.T @ g)


def _defaults(
    lr: float, momentum: float, precond: str, beta2: float, eps: float, every: int, wd: float
) -> dict[str, Any]:
    """Checked hyper-parameters shared by both momentum memories."""
    check_lr(lr)
    check_unit(momentum, "momentum")
    check_unit(beta2, "beta2")
    check_positive(eps, "eps")
    check_lr(wd, "weight_decay")
    if precond not in PRECONDITIONERS:
        raise ValueError(f"precond must be one of {PRECONDITIONERS}, got {precond!r}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"precond_every must be a positive int, got {every!r}")
    return dict(lr=lr, momentum=momentum, precond=precond, beta2=beta2, eps=eps, precond_every=every,
                weight_decay=wd)  # fmt: skip
