"""Deep optimizers: each reduces exactly to a known optimizer in its degenerate setting (20 steps, float64),
Muon equals torch.optim.Muon, Newton-Schulz outputs are near-orthogonal, every optimizer lowers a convex
quadratic and the paper's 2-D toy, state_dict resumes bit-identically, and bad input names the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nestlearn.optim import (
    M3,
    AssociativeAdam,
    DeepMomentum,
    DeltaGD,
    DeltaMomentum,
    Muon,
    PreconditionedMomentum,
    newton_schulz,
    route,
    split_parameters,
)
from nestlearn.optim.toy import START, psi, run_toy


def twin_params(shape=(7, 5), seed: int = 0) -> tuple[nn.Parameter, nn.Parameter]:
    torch.manual_seed(seed)
    p = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    return p, nn.Parameter(p.detach().clone())


def run_pair(ours, ref, p, q, steps: int = 20) -> float:
    """Feed both optimizers the same random gradients; return the largest parameter difference."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    return float((p - q).abs().max().detach())


SGD_TWINS = {
    "preconditioned identity": lambda ps: PreconditionedMomentum(ps, lr=0.1, momentum=0.9),
    "delta momentum, zeta 0": lambda ps: DeltaMomentum(ps, lr=0.1, momentum=0.9, zeta=0.0),
    "dmgd linear dot, inner lr 0": lambda ps: DeepMomentum(ps, lr=0.1, momentum=0.9, memory="linear", inner_lr=0),
    "dmgd mlp, inner lr 0": lambda ps: DeepMomentum(ps, lr=0.1, momentum=0.9, memory="mlp", inner_lr=0),
}


@pytest.mark.parametrize("name", sorted(SGD_TWINS))
def test_degenerate_settings_equal_momentum_sgd(name: str) -> None:
    p, q = twin_params()
    err = run_pair(SGD_TWINS[name]([p]), torch.optim.SGD([q], lr=0.1, momentum=0.9), p, q)
    assert err < 1e-12, err


def test_dgd_without_projection_equals_sgd() -> None:
    lin = nn.Linear(5, 7, bias=False).double()
    q = nn.Parameter(lin.weight.detach().clone())
    err = run_pair(DeltaGD([lin], lr=0.1, proj_lr=0.0), torch.optim.SGD([q], lr=0.1), lin.weight, q)
    assert err < 1e-12, err


@pytest.mark.parametrize(("wd", "ref"), [(0.0, torch.optim.Adam), (0.01, torch.optim.AdamW)])
def test_associative_adam_equals_adam(wd: float, ref) -> None:
    """Appendix B: the optimal L2-regression memory with value sqrt(H) + eps and ridge 2 eps sqrt(H) + eps^2."""
    p, q = twin_params()
    kw = {"weight_decay": wd} if wd else {}
    err = run_pair(AssociativeAdam([p], lr=0.01, weight_decay=wd), ref([q], lr=0.01, **kw), p, q)
    assert err < 1e-12, err


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_torch_muon(nesterov: bool) -> None:
    p, q = twin_params((12, 8))
    ours = Muon([p], lr=0.02, nesterov=nesterov)
    ref = torch.optim.Muon([q], lr=0.02, nesterov=nesterov)
    assert run_pair(ours, ref, p, q) < 1e-6


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_is_near_orthogonal(shape) -> None:
    """Quintic (5 steps, float32): singular values in a band around 1 (measured 0.68-1.13); cubic GD on
    ||X^T X - I||^2 (Eqs. 43-44, 40 steps) converges to 1."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(g, dtype=torch.float32))
    assert float(s.min()) > 0.6 and float(s.max()) < 1.2, (float(s.min()), float(s.max()))
    s3 = torch.linalg.svdvals(newton_schulz(g, 40, cubic=True, dtype=torch.float64))
    assert (s3 - 1).abs().max() < 1e-3


# name -> (factory(params, lr), lr on the quadratic, lr on the toy). Muon and M3 take normalised steps, so
# their rates differ from the momentum family's; "m3 as printed" shrinks its steps like AdaGrad (docs/decisions.md).
MAKERS = {
    "preconditioned identity": (lambda ps, lr: PreconditionedMomentum(ps, lr=lr, momentum=0.9), 0.02, 0.003),
    "preconditioned diagonal": (
        lambda ps, lr: PreconditionedMomentum(ps, lr=lr, momentum=0.9, precond="diagonal"),
        0.02,
        0.01,
    ),
    "preconditioned kronecker": (
        lambda ps, lr: PreconditionedMomentum(ps, lr=lr, momentum=0.9, precond="kronecker"),
        0.02,
        0.003,
    ),
    "delta momentum": (lambda ps, lr: DeltaMomentum(ps, lr=lr, momentum=0.9), 0.02, 0.003),
    "dmgd mlp dot": (lambda ps, lr: DeepMomentum(ps, lr=lr, momentum=0.9, inner_lr=0.01), 0.02, 0.003),
    "dmgd mlp l2": (lambda ps, lr: DeepMomentum(ps, lr=lr, momentum=0.9, objective="l2", inner_lr=0.01), 0.02, 0.003),
    "dmgd linear dot": (
        lambda ps, lr: DeepMomentum(ps, lr=lr, momentum=0.9, memory="linear", inner_lr=0.01),
        0.02,
        0.003,
    ),
    "muon": (lambda ps, lr: Muon(ps, lr=lr, weight_decay=0.0), 0.05, 0.02),
    "m3 stable": (lambda ps, lr: M3(ps, lr=lr, frequency=5), 0.05, 0.05),
    "m3 as printed": (lambda ps, lr: M3(ps, lr=lr, frequency=5, stable=False), 0.05, 5.0),
    "associative adam": (lambda ps, lr: AssociativeAdam(ps, lr=lr, weight_decay=0.0), 0.02, 0.05),
}


def make(name: str, params: list[nn.Parameter], which: int = 1) -> torch.optim.Optimizer:
    factory, *lrs = MAKERS[name]
    return factory(params, lrs[which - 1])


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_lowers_a_convex_quadratic(name: str) -> None:
    """f(W) = 1/2 ||A W - B||^2 with a well-conditioned A, 200 steps from W = 0: the loss falls by 10% or more."""
    g = torch.Generator().manual_seed(0)
    a = torch.eye(10, dtype=torch.float64) + 0.1 * torch.randn(10, 10, generator=g, dtype=torch.float64)
    b = torch.randn(10, 6, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(10, 6, dtype=torch.float64))
    opt = make(name, [w])

    def loss() -> torch.Tensor:
        return 0.5 * (a @ w - b).pow(2).sum()

    start = float(loss().detach())
    for _ in range(200):
        opt.zero_grad()
        loss().backward()
        opt.step()
    end = float(loss().detach())
    assert end < 0.9 * start, (start, end)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_lowers_the_toy_objective(name: str) -> None:
    """psi from (-3.5, 2) (Fig. 4): after 300 steps psi is below half its start (118.99)."""
    path = run_toy(lambda ps: make(name, ps, 2), 300)
    assert torch.isfinite(path).all()
    assert float(psi(path[-1])) < float(psi(torch.tensor(START, dtype=torch.float64))) / 2, path[-1]


def test_delta_momentum_forgets_along_the_gradient() -> None:
    """Eq. 49 by hand: m <- m (alpha I - zeta ĝ^T ĝ) - lr g, ĝ = g / ||g||."""
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = DeltaMomentum([p], lr=0.1, momentum=0.8, zeta=0.5)
    g1, g2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    p.grad = g1
    opt.step()
    p.grad = g2
    opt.step()
    m1 = -0.1 * g1
    gh = g2 / g2.norm()
    m2 = m1 @ (0.8 * torch.eye(3, dtype=torch.float64) - 0.5 * gh.T @ gh) - 0.1 * g2
    torch.testing.assert_close(opt.state[p]["m"], m2, rtol=0, atol=1e-14)


def test_dgd_projection_by_hand() -> None:
    """Eq. 57 with the batch expectation: W <- W - proj_lr W E[x̂ x̂^T] - lr g."""
    lin = nn.Linear(4, 3, bias=False).double()
    opt = DeltaGD([lin], lr=0.1, proj_lr=0.3)
    x = torch.randn(6, 4, dtype=torch.float64)
    w0 = lin.weight.detach().clone()
    lin(x).pow(2).sum().backward()
    g = lin.weight.grad.clone()
    opt.step()
    xh = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(lin.weight.detach(), w0 - 0.3 * w0 @ (xh.T @ xh / 6) - 0.1 * g, rtol=0, atol=1e-14)
    opt.remove()


def test_dmgd_memory_learns_and_costs_n_squared() -> None:
    p = nn.Parameter(torch.randn(50, 8, dtype=torch.float64))
    opt = DeepMomentum([p], lr=0.01, inner_lr=0.1)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    assert st["W1"].shape == (8, 8) and st["W2"].shape == (8, 8)  # O(n^2) for a [50, 8] weight
    assert st["W1"].abs().max() > 0  # the memory moved away from the identity read-out


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_state_dict_resumes_bit_identically(name: str) -> None:
    def run(p, opt, seed: int, steps: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()

    p, _ = twin_params((6, 4))
    opt = make(name, [p])
    run(p, opt, 0, 7)  # past M3's slow-momentum boundary (5)
    saved_p, saved = p.detach().clone(), copy.deepcopy(opt.state_dict())
    run(p, opt, 1, 6)
    q = nn.Parameter(saved_p.clone())
    again = make(name, [q])
    again.load_state_dict(saved)
    run(q, again, 1, 6)
    assert torch.equal(p, q)


def test_bad_input_names_the_fix() -> None:
    w = [nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        PreconditionedMomentum(w, lr=-1.0)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\)"):
        DeltaMomentum(w, momentum=1.0)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\)"):
        Muon(w, momentum=-0.1)
    with pytest.raises(ValueError, match="precond must be one of"):
        PreconditionedMomentum(w, precond="full")
    vec = [nn.Parameter(torch.randn(5))]
    for cls in (Muon, M3):
        with pytest.raises(ValueError, match=r"2-D weight matrices only.*route"):
            cls(vec)
    with pytest.raises(ValueError, match=r"needs nn\.Linear"):
        DeltaGD([nn.Embedding(3, 4)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unknown matrix optimizer"):
        route(nn.Linear(2, 2), "lion")


def test_routing_sends_every_parameter_once() -> None:
    from nestlearn.models import CausalLM, ModelConfig

    model = CausalLM(ModelConfig(variant="hope", vocab_size=64, d_model=16, n_layers=2, n_heads=2, mlp_hidden=24))
    matrices, others = split_parameters(model)
    assert len({id(p) for p in matrices + others}) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in matrices) and model.embed.weight in others  # tied head: once, to AdamW
    assert all(p.dim() != 2 or p is model.embed.weight for p in others)
    opt = route(model, "muon")
    ids = torch.randint(0, 64, (2, 9))
    before = copy.deepcopy(model.state_dict())
    model.loss(ids)[0].backward()
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2


@pytest.mark.parametrize("cls", [Muon, M3])
def test_batched_matrix_step_equals_one_matrix_at_a_time(cls) -> None:
    """Same-shape matrices share one batched Newton-Schulz call; each ends where it would alone."""
    ps = [nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(i))) for i in range(3)]
    alone = [nn.Parameter(p.detach().clone()) for p in ps]
    together = cls(ps, lr=0.01)
    singles = [cls([q], lr=0.01) for q in alone]
    g = torch.Generator().manual_seed(9)
    for _ in range(12):
        for p, q in zip(ps, alone, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        together.step()
        for opt in singles:
            opt.step()
    for p, q in zip(ps, alone, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
def test_unbatched_muon_equals_torch_muon() -> None:
    p, q = twin_params((12, 8))
    assert run_pair(Muon([p], lr=0.02, batched=False), torch.optim.Muon([q], lr=0.02), p, q) < 1e-6
