"""Adam read as an associative memory (Appendix B, Eqs. 101-105): a documented equivalence, tested step by step.

What this is: `AssociativeAdam`, an optimizer that computes each update as the optimal solution of the
L2-regression memory of Eq. 101,

    m* = argmin_m  sum_i ||m ⊙ g_i - P||^2 + lambda ||m||^2  =  M ⊙ P / (H + lambda)          (Eq. 102)

with the memory's statistics kept as exponential averages with bias correction (`M = E[g]`, `H = E[g^2]`, Adam's
moments). Choosing the value `P = sqrt(H) + eps` and the per-coordinate ridge `lambda = 2 eps sqrt(H) + eps^2`
gives `m* = M / (sqrt(H) + eps)`: exactly Adam's direction (the paper's Eq. 105 is the eps = 0 case,
`P = H^{1/2}`). `W <- W (1 - lr wd) - lr m*` then equals `torch.optim.AdamW` (and `Adam` with wd = 0) to
float rounding. Adam "learns a mapping between the gradients and their variance".
What it is not: a new optimizer; use `torch.optim.AdamW` for speed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .base import MemoryOptimizer, check_lr, check_positive, check_unit


def memory_solution(m: Tensor, h: Tensor, value: Tensor, ridge: Tensor) -> Tensor:
    """Eq. 102: `M ⊙ P / (H + lambda)`, element-wise."""
    return m * value / (h + ridge)


class AssociativeAdam(MemoryOptimizer):
    """AdamW as the optimal associative memory of Eq. 101 (decoupled weight decay)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        check_lr(lr)
        check_unit(betas[0], "betas[0]")
        check_unit(betas[1], "betas[1]")
        check_positive(eps, "eps")
        check_lr(weight_decay, "weight_decay")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def core(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state.update(step=0, M=torch.zeros_like(p), H=torch.zeros_like(p))
        state["step"] += 1
        (b1, b2), eps, t = group["betas"], group["eps"], state["step"]
        state["M"].lerp_(g, 1 - b1)
        state["H"].mul_(b2).addcmul_(g, g, value=1 - b2)
        m, h = state["M"] / (1 - b1**t), state["H"] / (1 - b2**t)
        root = h.sqrt()
        update = memory_solution(m, h, value=root + eps, ridge=2 * eps * root + eps * eps)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(update, alpha=group["lr"])
