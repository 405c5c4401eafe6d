"""Nonlinear outputs of the momentum memory: Muon (Eq. 52) and Multi-scale Momentum Muon (M3, Algorithm 1).

What this is: `Muon` and `M3`, drop-in optimizers for 2-D weight matrices (send everything else to AdamW with
`nestlearn.optim.route`).

Muon (Eq. 52: a linear momentum memory read through sigma = Newton-Schulz):
    m <- mu m + (1 - mu) g;  u = g + mu (m - g) (Nesterov) or m;  W <- W (1 - lr wd) - lr s(shape) NS(u)
which is `torch.optim.Muon` step for step (same iteration, coefficients, bfloat16 and scaling). Matrices of one
shape are orthogonalised in one batched call (`batched=True`, default): the per-matrix loop launches about a
hundred small kernels per matrix, which made the optimizer step 46% of a 20M model's training step on the H100
(docs/results/optimizers.md).

M3 (Algorithm 1 as printed; `stable=False`):
    M1 <- M1 + b1 g;  V <- V + b2 g^2;  every f steps: M2 <- M2 + b3 (sum of the last f gradients), O2 = NS(M2)
    W <- W - lr (NS(M1) + alpha O2) / (sqrt(V) + eps)
The printed momenta are plain sums: V grows linearly in t, so the steps shrink like AdaGrad's (1 / sqrt(t)), and
an orthogonalised matrix (entries about 1 / sqrt(n)) divided element-wise by sqrt(V) takes its largest steps
where the gradients have been smallest. Measured (tests/optim, float64): on a 10 x 6 quadratic, 200 steps at
lr 0.01 take the loss from 25.0 to 20.9 as printed and to 14.4 stabilised; on the toy of Fig. 4 the printed
form needs lr 5 to get from 119 to 12 in 300 steps, the stabilised one reaches 0.13 at lr 0.5.
`stable=True` (default) keeps the algorithm's structure (two momenta at two frequencies, each orthogonalised,
combined with alpha, scaled by the second moment) with exponential averages: M1, M2, V are EMAs (V
bias-corrected), M2 averages the chunk means, and the combined update is rescaled to RMS 0.2 (AdamW's typical
update RMS), so every step has the same bounded size whatever the gradients' history (docs/decisions.md).
In both forms `weight_decay` is decoupled, at the step's rate, before the update: `W <- W (1 - lr wd) - lr u`
with `u` the (rescaled) update above.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .base import MemoryOptimizer, check_lr, check_positive, check_unit
from .newton_schulz import QUINTIC, muon_scale, newton_schulz

Group = dict[str, Any]


class Muon(MemoryOptimizer):
    """Eq. 52 with a linear momentum memory and sigma = Newton-Schulz (quintic, `ns_steps` steps)."""

    matrix_only = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        *,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        scale: str = "original",
        eps: float = 1e-7,
        batched: bool = True,
    ) -> None:
        check_lr(lr)
        check_unit(momentum, "momentum")
        check_lr(weight_decay, "weight_decay")
        muon_scale((1, 1), scale)  # validates the name
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        scale=scale, eps=eps)  # fmt: skip
        super().__init__(params, defaults)
        if not batched:
            self.core_batch = None

    def core_batch(
        self, ps: list[Tensor], gs: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
    ) -> None:
        """`core` for same-shape matrices at once: foreach momentum, one batched Newton-Schulz."""
        for st, p in zip(states, ps, strict=True):
            st.setdefault("m", torch.zeros_like(p))
        ms, mu = [st["m"] for st in states], group["momentum"]
        torch._foreach_lerp_(ms, gs, 1 - mu)
        u = torch.stack(gs).lerp(torch.stack(ms), mu) if group["nesterov"] else torch.stack(ms)
        o = newton_schulz(u, group["ns_steps"], coefficients=QUINTIC, eps=group["eps"])
        torch._foreach_mul_(ps, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(ps, list(o.unbind(0)), alpha=-group["lr"] * muon_scale(ps[0].shape, group["scale"]))

    def core(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["m"] = torch.zeros_like(p)
        m, mu = state["m"], group["momentum"]
        m.lerp_(g, 1 - mu)
        u = g.lerp(m, mu) if group["nesterov"] else m
        o = newton_schulz(u, group["ns_steps"], coefficients=QUINTIC, eps=group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(o, alpha=-group["lr"] * muon_scale(p.shape, group["scale"]))


class M3(MemoryOptimizer):
    """Multi-scale Momentum Muon (Algorithm 1): fast momentum every step, slow momentum every `frequency` steps."""

    matrix_only = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
        alpha: float = 0.5,
        frequency: int = 10,
        ns_steps: int = 5,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        stable: bool = True,
    ) -> None:
        check_lr(lr)
        for i, b in enumerate(betas):
            check_unit(b, f"betas[{i}]")
        check_lr(alpha, "alpha")
        check_positive(eps, "eps")
        check_lr(weight_decay, "weight_decay")
        if not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"frequency must be a positive int, got {frequency!r}")
        defaults = dict(lr=lr, betas=betas, alpha=alpha, frequency=frequency, ns_steps=ns_steps, eps=eps,
                        weight_decay=weight_decay, stable=stable)  # fmt: skip
        super().__init__(params, defaults)

    def core(self, p: Tensor, g: Tensor, state: dict[str, Any], group: Group) -> None:
        self.core_batch([p], [g], [state], group)

    def core_batch(self, ps: list[Tensor], gs: list[Tensor], states: list[dict[str, Any]], group: Group) -> None:
        """Algorithm 1 for same-shape matrices: element-wise moments per matrix, Newton-Schulz batched."""
        vs = [self._moments(p, g, st, group) for p, g, st in zip(ps, gs, states, strict=True)]
        o1 = newton_schulz(torch.stack([st["M1"] for st in states]), group["ns_steps"]).unbind(0)  # line 9
        for p, g, st, v, o in zip(ps, gs, states, vs, o1, strict=True):
            self._apply(p, g, st, v, o, group)

    @staticmethod
    def _moments(p: Tensor, g: Tensor, state: dict[str, Any], group: Group) -> Tensor:
        """Lines 7-8; returns the second moment to divide by."""
        if not state:
            state.update(step=0, M1=torch.zeros_like(p), M2=torch.zeros_like(p), V=torch.zeros_like(p))
            state.update(chunk=torch.zeros_like(p), O2=torch.zeros_like(p))
        state["step"] += 1
        b1, b2, _ = group["betas"]
        if group["stable"]:  # exponential averages
            state["M1"].lerp_(g, 1 - b1)
            state["V"].mul_(b2).addcmul_(g, g, value=1 - b2)
            return state["V"] / (1 - b2 ** state["step"])
        state["M1"].add_(g, alpha=b1)  # as printed
        state["V"].addcmul_(g, g, value=b2)
        return state["V"]

    @staticmethod
    def _apply(p: Tensor, g: Tensor, state: dict[str, Any], v: Tensor, o1: Tensor, group: Group) -> None:
        """Line 10, then lines 3-4 for the next lower-frequency iteration when a chunk of `frequency` ends."""
        u = (o1 + group["alpha"] * state["O2"]) / (v.sqrt() + group["eps"])
        if group["stable"]:
            u = u * (0.2 / u.pow(2).mean().sqrt().clamp_min(1e-12))
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(u, alpha=group["lr"])
        state["chunk"].add_(g)
        if state["step"] % group["frequency"] == 0:
            b3 = group["betas"][2]
            if group["stable"]:
                state["M2"].lerp_(state["chunk"] / group["frequency"], 1 - b3)
            else:
                state["M2"].add_(state["chunk"], alpha=b3)
            state["O2"] = newton_schulz(state["M2"], group["ns_steps"])
            state["chunk"].zero_()
