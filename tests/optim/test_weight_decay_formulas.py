"""Weight decay of the deep optimizers against the update equations written out literally, step by step.

What this pins: with `weight_decay` on and the learning rate changed at every step (a schedule), every parameter
after every step of M3 (as printed and stabilised), `DeepMomentum` (the default read-out form and `form="paper"`,
linear and MLP memories), `PreconditionedMomentum` (identity, diagonal, Kronecker), `DeltaMomentum` and `DeltaGD`
equals a float64 loop written here from the documented update (1e-10). Every optimizer decays decoupled, as
AdamW does, with the step's own rate, applied to the weight before the step's update is added:

    W_t = (1 - lr_t wd) W_{t-1} + Δ_t

where `Δ_t` is the optimizer's own update at rate `lr_t` (M3: `-lr_t (NS(M1) + alpha O2) / (sqrt(V) + eps)`,
RMS-rescaled when stabilised; DMGD read-out: `-lr_t ||m_t|| phi(m_t / ||m_t||)`; DMGD paper: `+m_{theta_t}(u_t)`
with `theta_t = alpha theta_{t-1} - lr_t grad L`; momentum: `+m_t` with `m_t = alpha m_{t-1} - lr_t P(g_t)` or
Eq. 49's decay; DeltaGD: `W (I - proj_lr E[x̂ x̂^T]) - lr_t g`, the decay multiplying the projected weight). The
docstrings of `muon.py`, `deep.py`, `momentum.py` and `dgd.py` state these forms. Each test also checks that the
decay is visible: the same run without it ends more than 1e-3 away, far above the tolerance.

What this is not: the update rules without decay (tests/optim/test_formulas.py, tests/optim/test_dmgd_paper.py,
whose helpers this file reuses), Muon's and AssociativeAdam's decay (they equal torch.optim.Muon / AdamW with decay
on, tests/optim/test_optimizers.py), or anything about convergence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.optim import M3, DeepMomentum, DeltaGD, DeltaMomentum, PreconditionedMomentum

from .test_formulas import (
    DT,
    M3_SHAPES,
    as_matrix,
    assert_traces_equal,
    dmgd_reference,
    gradients,
    initial,
    m3_reference,
    momentum_reference,
)

LRS = (0.05, 0.03, 0.08, 0.02, 0.06, 0.04, 0.07)  # the rate of each step (a schedule changes group["lr"])
WD = 0.5  # lr_t * wd between 0.01 and 0.04 per step
VISIBLE = 1e-3  # the run without decay ends at least this far away


def run_scheduled(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    w0: list[Tensor],
    grads: list[list[Tensor]],
    prepare: Callable[[torch.optim.Optimizer, list[nn.Parameter]], None] | None = None,
) -> list[list[Tensor]]:
    """The optimizer under test fed the given gradients at rate `LRS[t]` on step t; the parameters after each step.
    `prepare(opt, params)` runs once before the first step (to set a memory's starting state)."""
    params = [nn.Parameter(w.clone()) for w in w0]
    opt = make(params)
    if prepare is not None:
        prepare(opt, params)
    trace = []
    for lr, gs in zip(LRS, grads, strict=False):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        trace.append([p.detach().clone() for p in params])
    return trace


def largest_gap(a: list[list[Tensor]], b: list[list[Tensor]]) -> float:
    return max(float((x - y).abs().max()) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def check(got: list[list[Tensor]], reference: Callable[[float], list[list[Tensor]]]) -> None:
    """`got` equals `reference(WD)` to 1e-10 and differs from `reference(0)` by more than `VISIBLE`."""
    assert_traces_equal(got, reference(WD))
    gap = largest_gap(got, reference(0.0))
    assert gap > VISIBLE, f"the decay changes the run by only {gap:.3g}"


# ------------------------------------------------------------------------------------------------------------
# M3 (Algorithm 1)


@pytest.mark.parametrize("stable", [False, True], ids=["as_printed", "stabilised"])
def test_m3_weight_decay(stable: bool) -> None:
    """7 steps with f = 3 (the slow momentum enters from step 4), two matrices of one shape (the batched path)."""
    kw = dict(betas=(0.9, 0.99, 0.8), alpha=0.7, frequency=3, ns_steps=5, eps=1e-8)
    w0, grads = initial(M3_SHAPES), gradients(M3_SHAPES, len(LRS))
    got = run_scheduled(lambda ps: M3(ps, lr=LRS[0], weight_decay=WD, stable=stable, **kw), w0, grads)
    check(got, lambda wd: m3_reference(w0, grads, lr=LRS, weight_decay=wd, stable=stable, **kw))


# ------------------------------------------------------------------------------------------------------------
# DeepMomentum, read-out form (the default)


DMGD_SHAPES = [(4, 5), (5,), (2, 2, 3)]


@pytest.mark.parametrize(("memory", "objective"), [("linear", "dot"), ("mlp", "l2")])
def test_deep_momentum_readout_weight_decay(memory: str, objective: str) -> None:
    """phi starts at the identity read-out: `A = I`, or `W1 = 0` with the `W2` the optimizer drew (taken from its
    state before the first step: the draw is not part of the formula)."""
    kw = dict(momentum=0.8, inner_lr=0.3)
    w0, grads = initial(DMGD_SHAPES), gradients(DMGD_SHAPES, len(LRS))
    phi0: list[dict[str, Tensor]] = []

    def prepare(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        for p in params:  # one zero-gradient step at rate 0 creates the state without moving anything
            p.grad = torch.zeros_like(p)
        lr = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = 0.0
        opt.step()
        opt.param_groups[0]["lr"] = lr
        for p in params:
            st = opt.state[p]
            phi0.append({k: st[k].clone() for k in ("A", "W1", "W2") if k in st})
            n = as_matrix(p).shape[1]
            if memory == "linear":
                assert torch.equal(st["A"], torch.eye(n, dtype=DT))
            else:
                assert not st["W1"].any() and st["W2"].shape == (2 * n, n)
            st.update(step=0, m=torch.zeros_like(p))  # back to a fresh start with that phi

    make = lambda ps: DeepMomentum(  # noqa: E731
        ps, lr=LRS[0], memory=memory, objective=objective, expansion=2, weight_decay=WD, **kw
    )
    got = run_scheduled(make, w0, grads, prepare)
    check(got, lambda wd: dmgd_reference(w0, grads, phi0, lr=LRS, weight_decay=wd, objective=objective, **kw))


# ------------------------------------------------------------------------------------------------------------
# DeepMomentum, form="paper" (Eq. 50 as printed)


def paper_memory(theta: dict[str, Tensor], x: Tensor) -> Tensor:
    """m(x) on one row: `A x` or `W1 silu(W2 x)`."""
    if "A" in theta:
        return theta["A"] @ x
    return theta["W1"] @ F.silu(theta["W2"] @ x)


def dmgd_paper_reference(
    w0: Tensor, grads: list[list[Tensor]], theta0: dict[str, Tensor], wd: float, *, alpha: float
) -> list[list[Tensor]]:
    """Eq. 50, one key (row) at a time, the inner gradient by autograd:
    `theta_t = alpha theta_{t-1} - lr_t grad_theta sum_j <m_theta(u_j), 1>` at `theta_{t-1}`, then
    `W_t = (1 - lr_t wd) W_{t-1} + m_{theta_t}(u_t)` row by row."""
    theta, w, trace = dict(theta0), w0.clone(), []
    for lr, (u,) in zip(LRS, grads, strict=False):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
        ones = torch.ones(u.shape[1], dtype=DT)
        loss = sum(torch.dot(paper_memory(leaves, u[j]), ones) for j in range(u.shape[0]))
        inner = torch.autograd.grad(loss, list(leaves.values()))
        theta = {k: alpha * v - lr * g for (k, v), g in zip(theta.items(), inner, strict=True)}
        with torch.no_grad():
            w = (1 - lr * wd) * w + torch.stack([paper_memory(theta, u[j]) for j in range(u.shape[0])])
        trace.append([w.clone()])
    return trace


@pytest.mark.parametrize("memory", ["mlp", "linear"])
def test_deep_momentum_paper_weight_decay(memory: str) -> None:
    """From a random memory (every parameter has a non-zero inner gradient from the first step)."""
    gen = torch.Generator().manual_seed(5)
    r, n, e, alpha = 5, 4, 2, 0.9
    if memory == "mlp":
        w1, w2 = torch.randn(n, e * n, generator=gen, dtype=DT), torch.randn(e * n, n, generator=gen, dtype=DT)
        theta0 = {"W1": w1, "W2": w2}
    else:
        theta0 = {"A": torch.randn(n, n, generator=gen, dtype=DT)}
    w0, grads = initial([(r, n)]), gradients([(r, n)], len(LRS))

    def prepare(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        opt.state[params[0]].update(step=0, **{k: v.clone() for k, v in theta0.items()})

    make = lambda ps: DeepMomentum(  # noqa: E731
        ps, lr=LRS[0], momentum=alpha, form="paper", memory=memory, expansion=e, weight_decay=WD
    )
    got = run_scheduled(make, w0, grads, prepare)
    check(got, lambda wd: dmgd_paper_reference(w0[0], grads, theta0, wd, alpha=alpha))


# ------------------------------------------------------------------------------------------------------------
# PreconditionedMomentum (Eq. 47) and DeltaMomentum (Eq. 49)


MOMENTUM_SHAPES = [(3, 5), (5,), (2, 3, 2)]
MOMENTUM_KW = dict(momentum=0.8, beta2=0.9, eps=1e-8, precond_every=2)


@pytest.mark.parametrize("precond", ["identity", "diagonal", "kronecker"])
def test_preconditioned_momentum_weight_decay(precond: str) -> None:
    """Kronecker with `precond_every = 2`: fresh roots at steps 1, 3, 5, 7."""
    w0, grads = initial(MOMENTUM_SHAPES), gradients(MOMENTUM_SHAPES, len(LRS))
    kw = {**MOMENTUM_KW, "precond": precond}
    got = run_scheduled(lambda ps: PreconditionedMomentum(ps, lr=LRS[0], weight_decay=WD, **kw), w0, grads)
    check(got, lambda wd: momentum_reference(w0, grads, lr=LRS, weight_decay=wd, **kw))


@pytest.mark.parametrize("precond", ["identity", "kronecker"])
def test_delta_momentum_weight_decay(precond: str) -> None:
    w0, grads = initial(MOMENTUM_SHAPES), gradients(MOMENTUM_SHAPES, len(LRS))
    kw = {**MOMENTUM_KW, "precond": precond, "zeta": 0.5}
    got = run_scheduled(lambda ps: DeltaMomentum(ps, lr=LRS[0], weight_decay=WD, **kw), w0, grads)
    check(got, lambda wd: momentum_reference(w0, grads, lr=LRS, weight_decay=wd, **kw))


# ------------------------------------------------------------------------------------------------------------
# DeltaGD (Eq. 57)


def test_delta_gd_weight_decay() -> None:
    """`W_t = (1 - lr_t wd) W_{t-1} (I - proj_lr E[x̂ x̂^T]) - lr_t g_t` with the inputs of the step's forward pass
    (proj_lr fixed, the rate scheduled), written out against a layer fed fixed inputs and gradients."""
    gen = torch.Generator().manual_seed(7)
    proj_lr, shape = 0.3, (3, 4)
    xs = [torch.randn(6, shape[1], generator=gen, dtype=DT) for _ in LRS]
    w0, grads = initial([shape]), gradients([shape], len(LRS))

    def reference(wd: float) -> list[list[Tensor]]:
        w, trace = w0[0].clone(), []
        for lr, x, (g,) in zip(LRS, xs, grads, strict=True):
            xh = x / x.norm(dim=1, keepdim=True)
            w = (1 - lr * wd) * (w @ (torch.eye(shape[1], dtype=DT) - proj_lr * xh.T @ xh / x.shape[0])) - lr * g
            trace.append([w.clone()])
        return trace

    lin = nn.Linear(shape[1], shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w0[0])
    opt = DeltaGD([lin], lr=LRS[0], proj_lr=proj_lr, weight_decay=WD)
    got = []
    for lr, x, (g,) in zip(LRS, xs, grads, strict=True):
        opt.zero_grad()
        lin(x)  # the forward pass the projector reads
        lin.weight.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        got.append([lin.weight.detach().clone()])
    opt.remove()
    check(got, reference)
    assert math.isclose(opt.param_groups[0]["proj_lr"], proj_lr)
