"""Deep Momentum Gradient Descent (DMGD, Eq. 50): the momentum's read-out is a memory learned while training.

What this is: `DeepMomentum`, a drop-in optimizer for weight matrices `[r, n]` (other shapes as `[shape[0], rest]`).

    m_t = beta m_{t-1} + g_t                                      the linear momentum memory (Eq. 33)
    W_t = W_{t-1} - lr ||m_t|| phi(m_t / ||m_t||)                 phi read at every row's direction (Eq. 50)
    phi <- phi - inner_lr * grad l(phi; k = m̂_{t-1}, v = ĝ_t)    phi's own inner objective, once per step

phi is one memory per weight, shared across its rows (so it costs O(n^2), never O(numel^2), D13): "mlp"
`x + W1 σ(W2 x)` (`W1 [n, e n]` starting at zero, `W2 [e n, n]`) or "linear" `A x` (`A` starting at I). Its
keys are the momentum rows that produced the previous update and its values the gradient rows that update then
met: the dot objective `l = -<phi(k), v> / r` is the first-order hypergradient of the task loss with respect to
phi (the previous step moved W by `-lr phi(k)`, and `g_t` says which way was downhill), the L2 objective
`1/(2r) ||phi(k) - v||^2` regresses the gradient the momentum will meet. Keys and values are unit rows and phi
reads directions (each row keeps its norm), so the memory's learning is independent of the gradients' scale:
with raw rows the inner step grew with `||g||^2` and diverged on the toy objective (docs/decisions.md). With
`inner_lr = 0` phi stays the identity and this is `torch.optim.SGD(momentum=beta)` exactly.
What it is not: a per-parameter MLP over flattened gradients (which would need O(numel^2) weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MemoryOptimizer, check_lr, check_positive, check_unit


class DeepMomentum(MemoryOptimizer):
    """DMGD (Eq. 50). `memory`: "mlp" or "linear"; `objective`: "dot" or "l2"; `expansion`: hidden width / n."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        *,
        memory: str = "mlp",
        objective: str = "dot",
        inner_lr: float = 1e-2,
        expansion: int = 1,
        weight_decay: float = 0.0,
    ) -> None:
        check_lr(lr)
        check_unit(momentum, "momentum")
        check_lr(inner_lr, "inner_lr")
        check_lr(weight_decay, "weight_decay")
        check_positive(expansion, "expansion")
        if memory not in ("mlp", "linear"):
            raise ValueError(f"memory must be 'mlp' or 'linear', got {memory!r}")
        if objective not in ("dot", "l2"):
            raise ValueError(f"objective must be 'dot' or 'l2', got {objective!r}")
        defaults = dict(lr=lr, momentum=momentum, memory=memory, objective=objective, inner_lr=inner_lr,
                        expansion=expansion, weight_decay=weight_decay)  # fmt: skip
        super().__init__(params, defaults)

    def core(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state.update(step=0, m=torch.zeros_like(p), **_init_memory(_rows(p).shape[1], group, p))
        m = state["m"]
        state["step"] += 1
        if group["inner_lr"] and state["step"] > 1:  # learn from how the previous update (phi(m_{t-1})) met g_t
            _inner_step(state, _unit(_rows(m)), _unit(_rows(g)), group)
        m.mul_(group["momentum"]).add_(g)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        rows = _rows(m)
        norms = rows.norm(dim=1, keepdim=True)
        update = norms * _read(state, rows / norms.clamp_min(1e-30), group["memory"])
        p.sub_(update.view_as(p), alpha=group["lr"])


def _rows(x: Tensor) -> Tensor:
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _init_memory(n: int, group: dict[str, Any], like: Tensor) -> dict[str, Tensor]:
    kw = dict(dtype=like.dtype, device=like.device)
    if group["memory"] == "linear":
        return {"A": torch.eye(n, **kw)}
    h = group["expansion"] * n
    gen = torch.Generator(device="cpu").manual_seed(n)  # deterministic, independent of the global RNG
    w2 = torch.randn(h, n, generator=gen, dtype=like.dtype).to(like.device) / math.sqrt(n)
    return {"W1": torch.zeros(n, h, **kw), "W2": w2}


def _read(state: dict[str, Tensor], x: Tensor, memory: str) -> Tensor:
    """phi(x) for rows x `[r, n]`."""
    if memory == "linear":
        return x @ state["A"].T
    return x + F.silu(x @ state["W2"].T) @ state["W1"].T


def _inner_step(state: dict[str, Tensor], k: Tensor, v: Tensor, group: dict[str, Any]) -> None:
    """One GD step of phi on its objective over the rows (keys k, values v `[r, n]`)."""
    names = ("A",) if group["memory"] == "linear" else ("W1", "W2")
    with torch.enable_grad():
        leaves = {name: state[name].detach().requires_grad_() for name in names}
        out = _read(leaves, k, group["memory"])
        if group["objective"] == "dot":
            loss = -(out * v).sum() / k.shape[0]
        else:
            loss = 0.5 * (out - v).pow(2).sum() / k.shape[0]
        grads = torch.autograd.grad(loss, list(leaves.values()))
    for name, grad in zip(names, grads, strict=True):
        state[name].sub_(grad, alpha=group["inner_lr"])
