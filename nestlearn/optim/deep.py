"""Deep Momentum Gradient Descent (DMGD, Eq. 50): momentum through a memory learned while training.

What this is: `DeepMomentum`, a drop-in optimizer for weight matrices `[r, n]` (other shapes as `[shape[0], rest]`),
in two forms. The default (`form="readout"`):

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

`form="paper"` is Eq. 50 as printed: the momentum is itself a memory `m(.)` with parameters theta, keyed by the
gradient, with value 1; `u_t = g_t` is the gradient, `alpha` is `momentum` and `eta` is `lr`:

    theta_t = alpha theta_{t-1} - eta grad_theta L(theta_{t-1}; u_t)       decay, then one GD step
    L(theta; u) = sum_j <m_theta(u_j), 1>                                   Eq. 50's dot objective, value 1
    W_t = W_{t-1} + m_{theta_t}(u_t)                                        row by row

Value 1 in this reading: every row `u_j` of the gradient (a vector in R^n) is one key, and each key's value is the
all-ones vector `1` in R^n, so the objective is the sum of every entry of the memory's output on the gradient's
rows, minimised (its sign is Eq. 33's: for the elementwise memory `m(u) = a ⊙ u`, `<m(u), 1> = <a, u>` is the
objective of the linear momentum and one step gives `a <- alpha a - eta u`). The memory is one per weight, shared
by its rows (O(n^2), D13): "mlp" `m(x) = W1 σ(W2 x)` (σ = SiLU, `W1 [n, e n]` starting at zero, `W2 [e n, n]`
~ N(0, 1/n) from a fixed seed) or "linear" `m(x) = A x` (`A` starting at zero): both start as the zero map, as
momentum starts at zero, and have no identity path (an identity would make `W + m(u)` ascend at the start). The
literal reading has a consequence worth knowing: the objective's gradient with respect to the read-out layer
(`W1`, or `A`) is `1 h^T` with `h` summed over the rows, so that layer, starting at zero, stays of the form
`1 c^T`, and `m(u) = <c, σ(W2 u)> 1`: every step moves all entries of a row by the same amount. The form is kept
to reproduce Eq. 50 as written, not as a recommended optimizer.
`weight_decay` is decoupled in both forms, at the step's rate, before the update is added: the read-out form's
`W_t = (1 - lr wd) W_{t-1} - lr ||m_t|| phi(...)`, the paper form's `W_t = (1 - lr wd) W_{t-1} + m_{theta_t}(u_t)`
(there `lr` is eta, the memory's step; tests/optim/test_weight_decay_formulas.py).
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
    """DMGD (Eq. 50). `form`: "readout" (the linear momentum read through a learned phi) or "paper" (the momentum
    is the memory, Eq. 50 as printed; `lr` is its step eta, `momentum` its decay alpha; `objective` stays "dot"
    and `inner_lr` unset). `memory`: "mlp" or "linear"; `objective`: "dot" or "l2"; `inner_lr`: phi's step
    (1e-2 when unset); `expansion`: hidden width / n."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        *,
        form: str = "readout",
        memory: str = "mlp",
        objective: str = "dot",
        inner_lr: float | None = None,
        expansion: int = 1,
        weight_decay: float = 0.0,
    ) -> None:
        if form not in ("readout", "paper"):
            raise ValueError(f"form must be 'readout' or 'paper', got {form!r}")
        if form == "paper" and (inner_lr is not None or objective != "dot"):
            raise ValueError(
                "form='paper' (Eq. 50) has one rate, lr (the memory's step), and the objective <m(u), 1>; "
                "remove inner_lr and objective, or use form='readout'"
            )
        inner_lr = INNER_LR if inner_lr is None else inner_lr
        check_lr(lr)
        check_unit(momentum, "momentum")
        check_lr(inner_lr, "inner_lr")
        check_lr(weight_decay, "weight_decay")
        check_positive(expansion, "expansion")
        if memory not in ("mlp", "linear"):
            raise ValueError(f"memory must be 'mlp' or 'linear', got {memory!r}")
        if objective not in ("dot", "l2"):
            raise ValueError(f"objective must be 'dot' or 'l2', got {objective!r}")
        defaults = dict(lr=lr, momentum=momentum, form=form, memory=memory, objective=objective,
                        inner_lr=inner_lr, expansion=expansion, weight_decay=weight_decay)  # fmt: skip
        super().__init__(params, defaults)

    def core(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if group.get("form", "readout") == "paper":
            _paper_step(p, g, state, group)
            return
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


INNER_LR = 1e-2  # phi's step in the readout form when inner_lr is not given


def _paper_step(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Eq. 50: the memory decays by alpha and takes one GD step on `sum_j <m(u_j), 1>`, then `W <- W + m(u)`."""
    if not state:
        state.update(step=0, **_init_memory(_rows(p).shape[1], group, p, zero_map=True))
    state["step"] += 1
    u = _rows(g)
    for name, grad in _paper_grads(state, u, group["memory"]).items():  # at theta_{t-1}
        state[name].mul_(group["momentum"]).sub_(grad, alpha=group["lr"])
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(_paper_read(state, u, group["memory"]).view_as(p))


def _paper_read(state: dict[str, Tensor], x: Tensor, memory: str) -> Tensor:
    """m(x) for rows x `[r, n]`: `A x` or `W1 σ(W2 x)` (no identity path)."""
    if memory == "linear":
        return x @ state["A"].T
    return F.silu(x @ state["W2"].T) @ state["W1"].T


def _paper_grads(state: dict[str, Tensor], u: Tensor, memory: str) -> dict[str, Tensor]:
    """The gradient of `sum_j <m(u_j), 1>` with respect to the memory's parameters, in closed form (rows u)."""
    if memory == "linear":  # d/dA sum(u A^T) = 1 (sum_j u_j)^T
        return {"A": _ones_outer(state["A"], u.sum(0))}
    w1, w2 = state["W1"], state["W2"]
    z = u @ w2.T  # [r, h]
    s = torch.sigmoid(z)
    dz = s * (1 + z * (1 - s)) * w1.sum(0)  # silu'(z) times dL/dh = W1^T 1
    return {"W1": _ones_outer(w1, F.silu(z).sum(0)), "W2": dz.T @ u}


def _ones_outer(like: Tensor, v: Tensor) -> Tensor:
    """`1 v^T` shaped like `like` `[n, len(v)]`."""
    return v[None].expand(like.shape[0], -1).clone()


def _rows(x: Tensor) -> Tensor:
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _init_memory(n: int, group: dict[str, Any], like: Tensor, *, zero_map: bool = False) -> dict[str, Tensor]:
    """phi's initial parameters: the identity read-out (`A = I`, or `x + W1 σ(W2 x)` with `W1 = 0`); with
    `zero_map` (the paper form's memory, no identity path) the zero map (`A = 0`, or `W1 = 0`)."""
    kw = dict(dtype=like.dtype, device=like.device)
    if group["memory"] == "linear":
        return {"A": torch.zeros(n, n, **kw) if zero_map else torch.eye(n, **kw)}
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
