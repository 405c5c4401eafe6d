"""DMGD as Eq. 50 (`DeepMomentum(form="paper")`) against a per-step loop written from the equation in float64:

    theta_t = alpha theta_{t-1} - eta grad_theta L2(theta_{t-1}; u_t),   L2(theta; u) = sum_j <m_theta(u_j), 1>
    W_t = W_{t-1} + m_{theta_t}(u_t)   (row by row)

with `u_t` the gradient, `u_j` its rows (the keys), the all-ones vector as every key's value, and the memory
`m(x) = W1 silu(W2 x)` or `m(x) = A x`, one per weight, shared by its rows.
What this is not: the default form's tests (tests/optim/test_optimizers.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.optim import DeepMomentum

R, N, E = 5, 4, 2  # weight [R, N], hidden width E * N
ALPHA, ETA = 0.9, 0.05


def m_mlp(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return theta["W1"] @ F.silu(theta["W2"] @ x)


def m_linear(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return theta["A"] @ x


def literal_step(theta: dict[str, torch.Tensor], w: torch.Tensor, u: torch.Tensor, m) -> tuple[dict, torch.Tensor]:
    """One step of Eq. 50, one row (key) at a time, the inner gradient by autograd."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    ones = torch.ones(N, dtype=torch.float64)
    loss = sum(torch.dot(m(leaves, u[j]), ones) for j in range(R))  # <m(u_j), 1>, summed over the keys
    grads = torch.autograd.grad(loss, list(leaves.values()))
    theta = {k: ALPHA * v - ETA * g for (k, v), g in zip(theta.items(), grads, strict=True)}
    with torch.no_grad():
        w = w + torch.stack([m(theta, u[j]) for j in range(R)])
    return theta, w


@pytest.mark.parametrize("memory", ["mlp", "linear"])
def test_paper_form_is_eq_50_step_by_step(memory: str) -> None:
    """Four steps from a random memory (so every parameter has a non-zero inner gradient from the first step)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(R, N, dtype=torch.float64))
    if memory == "mlp":
        theta = {"W1": torch.randn(N, E * N, dtype=torch.float64), "W2": torch.randn(E * N, N, dtype=torch.float64)}
    else:
        theta = {"A": torch.randn(N, N, dtype=torch.float64)}
    opt = DeepMomentum([p], lr=ETA, momentum=ALPHA, form="paper", memory=memory, expansion=E)
    opt.state[p].update(step=0, **{k: v.clone() for k, v in theta.items()})  # start both from the same memory
    w, m = p.detach().clone(), m_mlp if memory == "mlp" else m_linear
    for _ in range(4):
        u = torch.randn(R, N, dtype=torch.float64)
        p.grad = u.clone()
        opt.step()
        theta, w = literal_step(theta, w, u, m)
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-10)
        for k, v in theta.items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=1e-10)
    assert opt.state[p]["step"] == 4


def test_fresh_memory_moves_rows_along_ones() -> None:
    """The memory starts as the zero map (as momentum starts at zero), costs O(n^2) per [r, n] weight, and with
    value 1 its read-out layer stays `1 c^T`: every step moves all entries of a row by the same amount."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(50, 8, dtype=torch.float64))
    opt = DeepMomentum([p], lr=0.01, momentum=0.9, form="paper", expansion=1)
    for step in range(3):
        before = p.detach().clone()
        p.grad = torch.randn_like(p)
        opt.step()
        st = opt.state[p]
        if step == 0:
            assert st["W1"].shape == (8, 8) and st["W2"].shape == (8, 8)
        delta = p.detach() - before
        torch.testing.assert_close(delta, delta[:, :1].expand_as(delta), rtol=0, atol=1e-15)
        assert delta.abs().max() > 0
        torch.testing.assert_close(st["W1"], st["W1"][:1].expand_as(st["W1"]), rtol=0, atol=1e-15)


def test_paper_form_resumes_and_refuses() -> None:
    def run(p, opt, seed: int, steps: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = DeepMomentum([p], lr=0.05, form="paper")
    run(p, opt, 0, 3)
    saved_p, saved = p.detach().clone(), copy.deepcopy(opt.state_dict())
    run(p, opt, 1, 3)
    q = nn.Parameter(saved_p.clone())
    again = DeepMomentum([q], lr=0.05, form="paper")
    again.load_state_dict(saved)
    run(q, again, 1, 3)
    assert torch.equal(p, q)
    w = [nn.Parameter(torch.randn(3, 3))]
    for bad in (dict(inner_lr=0.1), dict(objective="l2")):
        with pytest.raises(ValueError, match=r"form='paper' \(Eq\. 50\) has one rate, lr"):
            DeepMomentum(w, form="paper", **bad)
    with pytest.raises(ValueError, match="form must be 'readout' or 'paper'"):
        DeepMomentum(w, form="eq50")
