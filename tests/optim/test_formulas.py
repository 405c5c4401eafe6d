"""The deep optimizers against their documented formulas, step by step.

What this pins: for M3 (`stable=False`, Algorithm 1 as `nestlearn/optim/muon.py` documents it, and the stabilised
default as its docstring and docs/decisions.md describe it), `PreconditionedMomentum` with the identity, diagonal
and Kronecker preconditioners, `DeltaMomentum` (Eqs. 48-49, normalised and as printed) and `DeepMomentum` (DMGD as
docs/decisions.md describes it: a linear momentum read row-wise through a memory phi that takes one GD step per
optimizer step on its own objective), every parameter after every one of a few steps equals an implementation
written here from those formulas in plain tensor code (float64, 1e-10). The gradients are fixed per step
(explicit `p.grad` assignments), so a wrong formula cannot hide behind a falling loss. The parameters have the
shapes each docstring names: matrices, vectors (one row) and 3-D tensors (`[shape[0], rest]`).

What this does not pin: the Newton-Schulz iteration inside M3 is not rewritten here in bfloat16. M3's reference
uses `torch.optim.Muon`'s own iteration (an implementation outside nestlearn; the module documents "the same
iteration, coefficients, bfloat16 and scaling"): any other bfloat16 rounding order differs by ~5e-2, far above
1e-10. The iteration's formula itself is pinned in float64 against a literal quintic/cubic loop
(`test_newton_schulz_formula`). Not pinned here: weight decay of M3, DMGD and DeltaGD, and any decay under a
schedule (tests/optim/test_weight_decay_formulas.py), the optimizers' state dicts, closures, and anything about
convergence (tests/optim/test_optimizers.py).

`PreconditionedMomentum(precond="identity")` equals `torch.optim.SGD(momentum=alpha)` at a constant learning rate
only (its docstring says so); `test_identity_preconditioner_differs_from_sgd_only_under_a_schedule` shows the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.optim import M3, DeepMomentum, DeltaMomentum, PreconditionedMomentum, newton_schulz

DT = torch.float64
ATOL = 1e-10
STEPS = 5
QUINTIC = (3.4445, -4.7750, 2.0315)  # the Muon coefficients named in nestlearn/optim/newton_schulz.py


def gradients(shapes: list[tuple[int, ...]], steps: int, scale: float = 1.0, seed: int = 1) -> list[list[Tensor]]:
    """Fixed gradients: `steps` lists with one tensor per parameter."""
    g = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(s, generator=g, dtype=DT) for s in shapes] for _ in range(steps)]


def initial(shapes: list[tuple[int, ...]], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=DT) for s in shapes]


def run_optimizer(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], w0: list[Tensor], grads: list[list[Tensor]]
) -> tuple[list[list[Tensor]], torch.optim.Optimizer, list[nn.Parameter]]:
    """The optimizer under test fed the given gradients; returns the parameters after every step."""
    params = [nn.Parameter(w.clone()) for w in w0]
    opt = make(params)
    trace = []
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        trace.append([p.detach().clone() for p in params])
    return trace, opt, params


def assert_traces_equal(got: list[list[Tensor]], want: list[list[Tensor]]) -> None:
    assert len(got) == len(want)
    for step, (gs, ws) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(gs, ws, strict=True)):
            err = float((g - w).abs().max())
            assert err <= ATOL, f"step {step + 1}, parameter {i}: max |difference| {err:.3g}"


def rates(lr: float | Sequence[float], steps: int) -> list[float]:
    """One learning rate per step: a constant, or the schedule given."""
    return [lr] * steps if isinstance(lr, int | float) else list(lr)


def as_matrix(x: Tensor) -> Tensor:
    """`[shape[0], rest]`; a vector is one row (the convention every momentum-family docstring states)."""
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------------------------------------
# Newton-Schulz


def ns_literal(g: Tensor, steps: int, coefficients: tuple[float, float, float]) -> Tensor:
    """The documented iteration in the given dtype: scale to Frobenius norm 1, work on the wide orientation,
    `X <- a X + (b A + c A^2) X` with `A = X X^T`."""
    a, b, c = coefficients
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(4, 7), (7, 4), (5, 5)])
def test_newton_schulz_formula(shape: tuple[int, int]) -> None:
    """Quintic (Muon coefficients) and cubic (`1.5 X - 0.5 X X^T X`, Eqs. 43-44) in float64, single and batched."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(newton_schulz(g, 5, dtype=DT), ns_literal(g, 5, QUINTIC), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        newton_schulz(g, 7, cubic=True, dtype=DT), ns_literal(g, 7, (1.5, -0.5, 0.0)), rtol=0, atol=1e-12
    )
    batch = torch.stack([g, 2 * g.flip(0)])
    want = torch.stack([ns_literal(b, 5, QUINTIC) for b in batch])
    torch.testing.assert_close(newton_schulz(batch, 5, dtype=DT), want, rtol=0, atol=1e-12)


def ns_muon(g: Tensor, steps: int) -> Tensor:
    """Muon's Newton-Schulz (bfloat16, torch's own implementation), back in g's dtype."""
    zeropower = pytest.importorskip("torch.optim._muon")._zeropower_via_newtonschulz
    return zeropower(g, QUINTIC, steps, 1e-7).to(g.dtype)


# ------------------------------------------------------------------------------------------------------------
# M3 (Algorithm 1)


M3_SHAPES = [(4, 6), (4, 6), (6, 3)]  # two of one shape (the batched Newton-Schulz call) and a tall one


def m3_reference(
    w0: list[Tensor], grads: list[list[Tensor]], *, lr: float | Sequence[float], betas: tuple[float, float, float],
    alpha: float, frequency: int, ns_steps: int, eps: float, stable: bool, weight_decay: float = 0.0,
) -> list[list[Tensor]]:  # fmt: skip
    """As printed (muon.py's docstring):
        M1 <- M1 + b1 g;  V <- V + b2 g^2;  W <- W - lr (NS(M1) + alpha O2) / (sqrt(V) + eps);
        every f steps: M2 <- M2 + b3 (sum of the last f gradients), O2 = NS(M2)   (O2 = 0 before the first)
    Stabilised (muon.py's docstring, docs/decisions.md *Deep optimizers*): M1, V EMAs (V bias-corrected), M2 the EMA
    of the chunk means, the combined update `(NS(M1) + alpha NS(M2)) / (sqrt(V̂) + eps)` rescaled to RMS 0.2.
    Both with decoupled weight decay at the step's rate: `W <- W (1 - lr_t wd) - lr_t u` (`lr` one rate or one per
    step)."""
    b1, b2, b3 = betas
    w = [x.clone() for x in w0]
    m1 = [torch.zeros_like(x) for x in w0]
    m2 = [torch.zeros_like(x) for x in w0]
    v = [torch.zeros_like(x) for x in w0]
    o2 = [torch.zeros_like(x) for x in w0]
    trace = []
    for t, (lr_t, gs) in enumerate(zip(rates(lr, len(grads)), grads, strict=True), start=1):
        for i, g in enumerate(gs):
            if stable:
                m1[i] = b1 * m1[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                second = v[i] / (1 - b2**t)
            else:
                m1[i] = m1[i] + b1 * g
                v[i] = v[i] + b2 * g * g
                second = v[i]
            u = (ns_muon(m1[i], ns_steps) + alpha * o2[i]) / (second.sqrt() + eps)
            if stable:
                u = u * 0.2 / u.pow(2).mean().sqrt()
            w[i] = (1 - lr_t * weight_decay) * w[i] - lr_t * u
            if t % frequency == 0:  # a chunk of f gradients ends: the slow momentum for the next chunk
                chunk = sum(grads[s][i] for s in range(t - frequency, t))
                m2[i] = b3 * m2[i] + (1 - b3) * chunk / frequency if stable else m2[i] + b3 * chunk
                o2[i] = ns_muon(m2[i], ns_steps)
        trace.append([x.clone() for x in w])
    return trace


@pytest.mark.parametrize("stable", [False, True], ids=["as_printed", "stabilised"])
def test_m3_follows_algorithm_1(stable: bool) -> None:
    """7 steps with f = 3: two slow-momentum boundaries, O2 used from step 4 on."""
    kw = dict(lr=0.05, betas=(0.9, 0.99, 0.8), alpha=0.7, frequency=3, ns_steps=5, eps=1e-8)
    w0, grads = initial(M3_SHAPES), gradients(M3_SHAPES, 7)
    got, _, _ = run_optimizer(lambda ps: M3(ps, stable=stable, **kw), w0, grads)
    assert_traces_equal(got, m3_reference(w0, grads, stable=stable, **kw))


# ------------------------------------------------------------------------------------------------------------
# PreconditionedMomentum (Eqs. 33, 46-47) and DeltaMomentum (Eqs. 48-49)


MOMENTUM_SHAPES = [(3, 5), (5,), (2, 3, 2)]  # a matrix, a vector (one row), a 3-D tensor ([shape[0], rest])


def inverse_fourth_root(a: Tensor, eps: float) -> Tensor:
    """`(A + eps' I)^{-1/4}` of a symmetric PSD factor (momentum.py, `_inverse_root`'s docstring: eps' relative to the
    largest eigenvalue). The constant (`eps' = 1e-6 lambda_max + eps`, negative eigenvalues clamped to 0) is read from
    the code; the docstrings do not state it."""
    vals, vecs = torch.linalg.eigh(a)
    shifted = vals.clamp_min(0) + 1e-6 * max(float(vals.max()), 1e-30) + eps
    return vecs @ torch.diag(shifted**-0.25) @ vecs.T


class Preconditioner:
    """`P(g)` of momentum.py's docstring, statistics per parameter.

    identity: `g`. diagonal: `v <- b2 v + (1 - b2) g^2`, `g / (sqrt(v / (1 - b2^t)) + eps)`. kronecker (2-D only,
    other shapes diagonal): `L <- b2 L + (1 - b2) g g^T`, `R <- b2 R + (1 - b2) g^T g`, `u = L^{-1/4} g R^{-1/4}` with
    the roots recomputed on the first step and every `every` steps after, `P(g) = u ||g|| / ||u||`."""

    def __init__(self, kind: str, beta2: float, eps: float, every: int) -> None:
        self.kind, self.b2, self.eps, self.every = kind, beta2, eps, every
        self.v: dict[int, Tensor] = {}
        self.factors: dict[int, tuple[Tensor, Tensor]] = {}
        self.roots: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, i: int, g: Tensor, t: int) -> Tensor:
        if self.kind == "identity":
            return g
        if self.kind == "kronecker" and g.dim() == 2:
            zero = (torch.zeros(g.shape[0], g.shape[0], dtype=DT), torch.zeros(g.shape[1], g.shape[1], dtype=DT))
            left, right = self.factors.get(i, zero)
            left, right = self.b2 * left + (1 - self.b2) * g @ g.T, self.b2 * right + (1 - self.b2) * g.T @ g
            self.factors[i] = (left, right)
            if (t - 1) % self.every == 0:
                self.roots[i] = (inverse_fourth_root(left, self.eps), inverse_fourth_root(right, self.eps))
            left_root, right_root = self.roots[i]
            u = left_root @ g @ right_root
            return u * g.norm() / u.norm()
        v = self.b2 * self.v.get(i, torch.zeros_like(g)) + (1 - self.b2) * g * g
        self.v[i] = v
        return g / ((v / (1 - self.b2**t)).sqrt() + self.eps)


def momentum_reference(
    w0: list[Tensor], grads: list[list[Tensor]], *, lr: float | Sequence[float], momentum: float, precond: str,
    beta2: float, eps: float, precond_every: int, weight_decay: float, zeta: float | None = None,
    normalize: bool = True,
) -> list[list[Tensor]]:  # fmt: skip
    """momentum.py's docstring: `m <- alpha m - lr P(g)` (Eq. 47) or `m <- m (alpha I - zeta ĝ^T ĝ) - lr P(g)`
    (Eq. 49; `ĝ = g / ||g||_F` when normalised, else g), then `W <- W (1 - lr wd) + m`; m and g as
    `[shape[0], rest]`."""
    pre = Preconditioner(precond, beta2, eps, precond_every)
    w = [x.clone() for x in w0]
    m = [torch.zeros_like(x) for x in w0]
    trace = []
    for t, (lr_t, gs) in enumerate(zip(rates(lr, len(grads)), grads, strict=True), start=1):
        for i, g in enumerate(gs):
            if zeta is None:
                decayed = momentum * m[i]
            else:
                mm, gm = as_matrix(m[i]), as_matrix(g)
                gh = gm / gm.norm() if normalize else gm
                eye = torch.eye(gm.shape[1], dtype=DT)
                decayed = (mm @ (momentum * eye - zeta * gh.T @ gh)).reshape(g.shape)
            m[i] = decayed - lr_t * pre(i, g, t)
            w[i] = w[i] * (1 - lr_t * weight_decay) + m[i]
        trace.append([x.clone() for x in w])
    return trace


MOMENTUM_KW = dict(lr=0.1, momentum=0.8, beta2=0.9, eps=1e-8, precond_every=2, weight_decay=0.01)


@pytest.mark.parametrize("precond", ["identity", "diagonal", "kronecker"])
def test_preconditioned_momentum_follows_eq_47(precond: str) -> None:
    """Kronecker with `precond_every = 2`: fresh roots at steps 1, 3, 5, the stale ones at 2 and 4."""
    w0, grads = initial(MOMENTUM_SHAPES), gradients(MOMENTUM_SHAPES, STEPS)
    got, _, _ = run_optimizer(lambda ps: PreconditionedMomentum(ps, precond=precond, **MOMENTUM_KW), w0, grads)
    assert_traces_equal(got, momentum_reference(w0, grads, precond=precond, **MOMENTUM_KW))


@pytest.mark.parametrize(
    ("precond", "zeta", "normalize", "scale"),
    [("identity", 0.5, True, 1.0), ("diagonal", 0.7, True, 1.0), ("identity", 1.0, False, 0.3)],
    ids=["normalised", "normalised_diagonal", "as_printed"],
)
def test_delta_momentum_follows_eq_49(precond: str, zeta: float, normalize: bool, scale: float) -> None:
    """As printed (`g^T g`, zeta 1) with gradients of norm < 1, where it is stable (docs/decisions.md)."""
    w0, grads = initial(MOMENTUM_SHAPES), gradients(MOMENTUM_SHAPES, STEPS, scale=scale)
    kw = {**MOMENTUM_KW, "precond": precond, "zeta": zeta, "normalize": normalize}
    got, _, _ = run_optimizer(lambda ps: DeltaMomentum(ps, **kw), w0, grads)
    assert_traces_equal(got, momentum_reference(w0, grads, **kw))


def test_identity_preconditioner_differs_from_sgd_only_under_a_schedule() -> None:
    """As documented: equal to momentum SGD at a constant rate (`test_degenerate_settings_equal_momentum_sgd`), but
    with the rate halved every step Eq. 33's lr-scaled momentum and SGD's rate-scaled buffer part (0.51 here)."""
    w0, grads = initial([(4, 3)]), gradients([(4, 3)], STEPS)
    params, twins = [nn.Parameter(w0[0].clone())], [nn.Parameter(w0[0].clone())]
    ours, sgd = PreconditionedMomentum(params, lr=0.1, momentum=0.9), torch.optim.SGD(twins, lr=0.1, momentum=0.9)
    for t, (g,) in enumerate(grads):
        for opt, (p,) in ((ours, params), (sgd, twins)):
            opt.param_groups[0]["lr"] = 0.1 * 0.5**t
            p.grad = g.clone()
            opt.step()
    err = float((params[0] - twins[0]).detach().abs().max())
    assert err > 0.1, err


# ------------------------------------------------------------------------------------------------------------
# DeepMomentum (DMGD, Eq. 50 as docs/decisions.md departure 24 and deep.py describe it)


DMGD_SHAPES = [(4, 5), (5,), (2, 2, 3)]


def phi_read(mem: dict[str, Tensor], x: Tensor) -> Tensor:
    """phi on rows x `[r, n]`: linear `A x`, or `x + W1 silu(W2 x)` (D2's residual MLP)."""
    if "A" in mem:
        return x @ mem["A"].T
    return x + F.silu(x @ mem["W2"].T) @ mem["W1"].T


def phi_grad(mem: dict[str, Tensor], k: Tensor, v: Tensor, objective: str) -> dict[str, Tensor]:
    """Gradient of phi's objective over the r rows, by hand: dot `-<phi(k), v> / r`, L2 `1/(2r) ||phi(k) - v||^2`."""
    r = k.shape[0]
    e = (-v if objective == "dot" else phi_read(mem, k) - v) / r  # dl/dphi(k), one row per key
    if "A" in mem:
        return {"A": e.T @ k}
    z = k @ mem["W2"].T
    s = torch.sigmoid(z)
    dz = (e @ mem["W1"]) * s * (1 + z * (1 - s))  # silu'(z) = s (1 + z (1 - s))
    return {"W1": e.T @ F.silu(z), "W2": dz.T @ k}


def unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True)


def dmgd_reference(
    w0: list[Tensor], grads: list[list[Tensor]], phi0: list[dict[str, Tensor]], *, lr: float | Sequence[float],
    momentum: float, inner_lr: float, objective: str, weight_decay: float = 0.0,
) -> list[list[Tensor]]:  # fmt: skip
    """deep.py's docstring, per weight (rows `[shape[0], rest]`):
        phi <- phi - inner_lr grad l(phi; k = m̂_{t-1}, v = ĝ_t)      from step 2 (there is no previous update at 1)
        m_t = beta m_{t-1} + g_t
        W_t = (1 - lr_t wd) W_{t-1} - lr_t ||m_t|| phi(m_t / ||m_t||)  row-wise (`lr` one rate or one per step)
    phi's step comes first: it learns from how the previous update met g_t, and this step reads the new phi. The
    docstring lists phi's step after `W_t` and states no order; this is the reading the code implements (phi's step
    last changes every parameter by ~0.1 here)."""
    w = [x.clone() for x in w0]
    m = [torch.zeros_like(x) for x in w0]
    phi = [{name: t.clone() for name, t in p.items()} for p in phi0]
    trace = []
    for t, (lr_t, gs) in enumerate(zip(rates(lr, len(grads)), grads, strict=True), start=1):
        for i, g in enumerate(gs):
            if t > 1:
                grad = phi_grad(phi[i], unit_rows(as_matrix(m[i])), unit_rows(as_matrix(g)), objective)
                phi[i] = {name: phi[i][name] - inner_lr * grad[name] for name in phi[i]}
            m[i] = momentum * m[i] + g
            rows = as_matrix(m[i])
            norms = rows.norm(dim=1, keepdim=True)
            w[i] = (1 - lr_t * weight_decay) * w[i] - lr_t * (norms * phi_read(phi[i], rows / norms)).reshape(g.shape)
        trace.append([x.clone() for x in w])
    return trace


@pytest.mark.parametrize("objective", ["dot", "l2"])
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_deep_momentum_follows_dmgd(memory: str, objective: str) -> None:
    """phi starts at the identity: `A = I`, or `W1 = 0` with `W2` as the optimizer drew it (its random draw is not
    part of the formula pinned here; it is read from the state after step 1, before phi's first step)."""
    kw = dict(lr=0.1, momentum=0.8, inner_lr=0.3)
    w0, grads = initial(DMGD_SHAPES), gradients(DMGD_SHAPES, STEPS)
    make = lambda ps: DeepMomentum(ps, memory=memory, objective=objective, expansion=2, **kw)  # noqa: E731
    _, opt1, ps1 = run_optimizer(make, w0, grads[:1])
    phi0 = []
    for p in ps1:
        n = as_matrix(p).shape[1]
        if memory == "linear":
            phi0.append({"A": torch.eye(n, dtype=DT)})
        else:
            st = opt1.state[p]
            assert st["W1"].shape == (n, 2 * n) and not st["W1"].any() and st["W2"].shape == (2 * n, n)
            phi0.append({"W1": torch.zeros(n, 2 * n, dtype=DT), "W2": st["W2"].clone()})
    got, opt, ps = run_optimizer(make, w0, grads)
    assert_traces_equal(got, dmgd_reference(w0, grads, phi0, objective=objective, **kw))
    for p, start in zip(ps, phi0, strict=True):  # phi did learn: this is not the inner_lr = 0 case
        name = "A" if memory == "linear" else "W1"
        assert float((opt.state[p][name] - start[name]).abs().max()) > 1e-3
