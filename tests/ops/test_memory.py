"""The deep-memory op: chunk form == per-token reference, gradients, state carry, precision, errors."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from nestlearn.ops.memory import MemorySpec, MemoryState, init_state, memory_chunk, memory_naive

FP64_TOL = 1e-10


def make_inputs(
    spec: MemorySpec, B: int, T: int, H: int, D: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> dict:
    """Unit-norm keys and queries (D6), gates in [0, 1] scaled so the recurrence stays bounded."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    eta_scale = 1.0 if spec.kind == "linear" else 0.1  # the MLP's hidden layer has ||h||^2 ~ 20
    x = {
        "q": unit(B, T, H, D),
        "k": unit(B, T, H, D),
        "v": torch.randn(B, T, H, D, generator=g, dtype=torch.float64),
        "eta": eta_scale * rand(B, T, H),
        "alpha": 0.5 + 0.5 * rand(B, T, H) if spec.decay else None,
        "beta": 0.9 * rand(B, T, H) if spec.momentum else None,
    }
    x = {name: (t.to(dtype) if t is not None else None) for name, t in x.items()}
    st = init_state(spec, B, H, D, dtype=torch.float64, generator=g)
    momenta = tuple(0.1 * torch.randn(s.shape, generator=g, dtype=torch.float64) for s in st.momenta)
    x["state"] = MemoryState(st.weights, momenta)
    return x


def leaves(x: dict) -> list[torch.Tensor]:
    """Every differentiable input, in a fixed order: q, k, v, gates, initial weights and momenta."""
    out = [t for name, t in x.items() if name != "state" and t is not None]
    return out + list(x["state"].weights) + list(x["state"].momenta)


def with_grad(x: dict) -> dict:
    y = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items() if n != "state"}
    st = x["state"]
    y["state"] = MemoryState(
        tuple(w.clone().requires_grad_() for w in st.weights),
        tuple(s.clone().requires_grad_() for s in st.momenta),
    )
    return y


def run(fn, x: dict, spec: MemorySpec, C: int):
    return fn(x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], state=x["state"], spec=spec, chunk_size=C)


def flat(o: torch.Tensor, st: MemoryState) -> list[torch.Tensor]:
    return [o, *st.weights, *st.momenta]


def outputs_and_grads(fn, x: dict, spec: MemorySpec, C: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs, final state and the gradients of a random projection of all of them w.r.t. every input."""
    x = with_grad(x)
    outs = flat(*run(fn, x, spec, C))
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves(x))
    return [o.detach() for o in outs], list(grads)


def assert_close_all(ref: list[torch.Tensor], got: list[torch.Tensor], tol: float, what: str) -> None:
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        scale = max(1.0, a.abs().max().item())
        err = (a - b).abs().max().item()
        assert err <= tol * scale, f"{what}[{i}]: max error {err:.3e} > {tol:.0e} x {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# chunk == naive


SHAPES = list(itertools.product([1, 3, 16, 64], [1, 17, 100, 256]))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(("C", "T"), SHAPES)
def test_chunk_matches_naive(kind: str, C: int, T: int) -> None:
    """Outputs, final weights and momenta, and gradients w.r.t. every input agree to 1e-10 in fp64."""
    D = (8, 12, 16)[SHAPES.index((C, T)) % 3]
    spec = MemorySpec(kind=kind)
    x = make_inputs(spec, B=3, T=T, H=2, D=D)
    ref_out, ref_grad = outputs_and_grads(memory_naive, x, spec, C)
    out, grad = outputs_and_grads(memory_chunk, x, spec, C)
    assert_close_all(ref_out, out, FP64_TOL, "outputs/state")
    assert_close_all(ref_grad, grad, FP64_TOL, "gradients")


VARIANTS = {
    "plain_gd": dict(dgd=False),
    "no_momentum": dict(momentum=False),
    "no_decay": dict(decay=False),
    "titans_no_extras": dict(dgd=False, momentum=False, decay=False),
    "dot": dict(objective="dot"),
    "gelu": dict(activation="gelu"),
    "tanh_expansion2": dict(activation="tanh", expansion=2),
    "self_values": dict(self_values=True),
    "self_values_plain_gd": dict(self_values=True, dgd=False),
    "out_norm_titans": dict(out_norm=True, dgd=False),  # MLP only
    "out_norm_dgd_self_values": dict(out_norm=True, self_values=True),  # MLP only
    "clip_plain_gd": dict(dgd=False, max_grad_norm=1.0),  # ||G_t|| ~ 0.5-10 here: some tokens clipped
    "clip_dgd_self_values": dict(self_values=True, max_grad_norm=1.0),
}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chunk_matches_naive_variants(kind: str, variant: str) -> None:
    if kind == "linear" and "out_norm" in VARIANTS[variant]:
        pytest.skip("out_norm is defined for the MLP memory only")
    spec = MemorySpec(kind=kind, **VARIANTS[variant])
    x = make_inputs(spec, B=2, T=45, H=3, D=12, seed=3)
    ref_out, ref_grad = outputs_and_grads(memory_naive, x, spec, 8)
    out, grad = outputs_and_grads(memory_chunk, x, spec, 8)
    assert_close_all(ref_out, out, FP64_TOL, "outputs/state")
    assert_close_all(ref_grad, grad, FP64_TOL, "gradients")


def test_switches_equal_their_gates() -> None:
    """momentum=False is beta = 0 and decay=False is alpha = 1 in the full optimizer."""
    full = MemorySpec(kind="mlp")
    x = make_inputs(full, B=2, T=30, H=2, D=8)
    x["beta"] = torch.zeros_like(x["beta"])
    x["alpha"] = torch.ones_like(x["alpha"])
    ref, _ = run(memory_chunk, x, full, 4)
    off = MemorySpec(kind="mlp", momentum=False, decay=False)
    y = dict(x, alpha=None, beta=None)
    got, _ = run(memory_chunk, y, off, 4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-14)


def test_chunk_size_changes_semantics() -> None:
    """Freezing the gradient per chunk is a real change (D5): C = 1 and C = 8 disagree."""
    spec = MemorySpec(kind="linear")
    x = make_inputs(spec, B=1, T=32, H=1, D=8)
    o1, _ = run(memory_naive, x, spec, 1)
    o8, _ = run(memory_naive, x, spec, 8)
    assert (o1 - o8).abs().max() > 1e-3


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradcheck(fn, kind: str) -> None:
    """torch.autograd.gradcheck through the inner loop, w.r.t. every input (D7)."""
    spec = MemorySpec(kind=kind, expansion=2)
    x = make_inputs(spec, B=2, T=5, H=1, D=3)
    names = [n for n in x if n != "state"]
    n_w = len(x["state"].weights)

    def f(*args: torch.Tensor):
        kw = dict(zip(names, args[: len(names)], strict=True))
        rest = args[len(names) :]
        st = MemoryState(tuple(rest[:n_w]), tuple(rest[n_w:]))
        o, s = fn(**kw, state=st, spec=spec, chunk_size=2)
        return (o, *s.weights, *s.momenta)

    inputs = tuple(t.clone().requires_grad_() for t in leaves(x))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_gradcheck_clipped(fn) -> None:
    """gradcheck through the clipped inner gradient, with clipped and unclipped tokens in the sequence."""
    spec = MemorySpec(kind="mlp", expansion=2, dgd=False, max_grad_norm=1.0)
    x = make_inputs(spec, B=1, T=6, H=1, D=3, seed=2)
    names = [n for n in x if n != "state"]

    def f(*args: torch.Tensor):
        kw = dict(zip(names, args[: len(names)], strict=True))
        o, s = fn(**kw, state=x["state"], spec=spec, chunk_size=2)
        return (o, *s.weights)

    inputs = tuple(x[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the inner-gradient clip (MemorySpec.max_grad_norm)


def _write_norm(new: MemoryState, old: MemoryState) -> torch.Tensor:
    """Frobenius norm of the change to all fast weights together `[B, H]`."""
    return sum(((a - b) ** 2).sum((-1, -2)) for a, b in zip(new.weights, old.weights, strict=True)).sqrt()


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_clip_bounds_each_write(fn) -> None:
    """Plain GD without momentum or decay, C = 1: from the same state, token t moves the weights by
    `eta_t ||G_t||` unclipped and by `eta_t min(||G_t||, c)` clipped (checked along the clipped trajectory)."""
    base = MemorySpec(kind="mlp", dgd=False, momentum=False, decay=False)
    x = make_inputs(base, B=2, T=12, H=2, D=6, seed=4)
    st = MemoryState(x["state"].weights, tuple(torch.zeros_like(w) for w in x["state"].weights))
    c, n_clipped = 2.0, 0
    for t in range(12):
        xt, eta = _slice(x, t, t + 1, st), x["eta"][:, t]
        free = _write_norm(run(fn, xt, base, 1)[1], st) / eta  # ||G_t||
        _, new = run(fn, xt, dataclasses.replace(base, max_grad_norm=c), 1)
        torch.testing.assert_close(_write_norm(new, st) / eta, free.clamp(max=c), rtol=1e-10, atol=0)
        n_clipped, st = n_clipped + int((free > c).sum()), new
    assert 0 < n_clipped < 48, "the test needs clipped and unclipped tokens"


def test_clip_off_and_loose_are_identical() -> None:
    """A clip above every token's gradient norm changes nothing; a tight one changes the outputs."""
    spec = MemorySpec(kind="mlp", dgd=False)
    x = make_inputs(spec, B=2, T=40, H=2, D=8, seed=5)
    o_free, _ = run(memory_chunk, x, spec, 8)
    o_loose, _ = run(memory_chunk, x, dataclasses.replace(spec, max_grad_norm=1e6), 8)
    o_tight, _ = run(memory_chunk, x, dataclasses.replace(spec, max_grad_norm=0.1), 8)
    assert torch.equal(o_free, o_loose)
    assert (o_free - o_tight).abs().max() > 1e-3


def _diverging_inputs(T: int, C: int, seed: int = 1) -> dict:
    """Keys near a 2-D subspace, targets of norm ~8, eta at its 1/C cap, momentum 0.9, no decay: the chunk's
    frozen gradients overshoot and plain GD on the MLP memory diverges (the Titans MAG failure)."""
    g = torch.Generator().manual_seed(seed)
    H, D = 2, 16
    k = torch.randn(1, T, H, 2, generator=g) @ torch.randn(2, D, generator=g)
    k = F.normalize(k + 0.1 * torch.randn(1, T, H, D, generator=g), dim=-1)
    gates = dict(eta=torch.full((1, T, H), 1 / C), alpha=torch.ones(1, T, H), beta=torch.full((1, T, H), 0.9))
    state = init_state(MemorySpec(kind="mlp"), 1, H, D, generator=g)
    return dict(q=k, k=k, v=2 * torch.randn(1, T, H, D, generator=g), **gates, state=state)


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_clip_keeps_plain_gd_finite(fn) -> None:
    """The measured failure (docs/decisions.md): without the clip the memory reaches inf/NaN within 256 tokens;
    with c = 3 (the Titans default) every output stays finite and bounded."""
    x = _diverging_inputs(T=256, C=16)
    spec = MemorySpec(kind="mlp", dgd=False)
    o_free, _ = run(fn, x, spec, 16)
    o_clip, st = run(fn, x, dataclasses.replace(spec, max_grad_norm=3.0), 16)
    assert not torch.isfinite(o_free).all()
    assert torch.isfinite(o_clip).all() and o_clip.abs().max() < 1e3
    assert all(torch.isfinite(w).all() for w in st.weights)


# ---------------------------------------------------------------------------------------------
# state and independence


def _slice(x: dict, lo: int, hi: int, state: MemoryState) -> dict:
    y = {n: (t[:, lo:hi] if t is not None and n != "state" else t) for n, t in x.items()}
    y["state"] = state
    return y


def _assert_same_state(a: MemoryState, b: MemoryState, tol: float) -> None:
    assert a.offset == b.offset
    for u, w in zip(a.weights + a.momenta + a.anchor, b.weights + b.momenta + b.anchor, strict=True):
        torch.testing.assert_close(w, u, rtol=0, atol=tol)


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(("C", "splits"), [(1, [13]), (8, [16]), (8, [5, 11, 40]), (16, [3, 4, 30, 31])])
def test_state_carry(fn, kind: str, C: int, splits: list[int]) -> None:
    """One call == the same tokens in pieces with the state passed on, at and inside chunk boundaries (D12)."""
    spec = MemorySpec(kind=kind, self_values=kind == "mlp")
    x = make_inputs(spec, B=2, T=61, H=2, D=8)
    o, st = run(fn, x, spec, C)
    outs, carried = [], x["state"]
    for lo, hi in itertools.pairwise([0, *splits, 61]):
        oi, carried = run(fn, _slice(x, lo, hi, carried), spec, C)
        outs.append(oi)
    torch.testing.assert_close(torch.cat(outs, dim=1), o, rtol=0, atol=1e-12)
    _assert_same_state(st, carried, 1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_token_by_token_equals_one_pass(kind: str) -> None:
    """Decoding one token per call (the chunk form) equals one pass of the reference, chunks of 8 included."""
    spec = MemorySpec(kind=kind, self_values=True)
    x = make_inputs(spec, B=2, T=21, H=2, D=8, seed=5)
    o, st = run(memory_naive, x, spec, 8)
    outs, carried = [], x["state"]
    for t in range(21):
        oi, carried = run(memory_chunk, _slice(x, t, t + 1, carried), spec, 8)
        outs.append(oi)
    torch.testing.assert_close(torch.cat(outs, dim=1), o, rtol=0, atol=1e-12)
    _assert_same_state(st, carried, 1e-12)


@pytest.mark.parametrize("out_norm", [False, True])
def test_mlp_step_equals_autograd(out_norm: bool) -> None:
    """One plain-GD token of the MLP memory == W - eta * autograd grad of 1/2 ||k + LN?(W1 σ(W2 k)) - v||^2."""
    spec = MemorySpec(kind="mlp", dgd=False, momentum=False, decay=False, out_norm=out_norm, expansion=2)
    x = make_inputs(spec, B=1, T=1, H=1, D=6, seed=7)
    w = [t.clone().requires_grad_() for t in x["state"].weights]
    k, v = x["k"][0, 0, 0], x["v"][0, 0, 0]
    a = w[0][0, 0] @ F.silu(w[1][0, 0] @ k)
    branch = F.layer_norm(a, a.shape, eps=1e-5) if out_norm else a
    grads = torch.autograd.grad(0.5 * ((k + branch - v) ** 2).sum(), w)
    state = MemoryState(x["state"].weights, tuple(torch.zeros_like(t) for t in w))
    _, st = memory_naive(x["q"], x["k"], x["v"], x["eta"], state=state, spec=spec, chunk_size=1)
    for new, old, g in zip(st.weights, w, grads, strict=True):
        torch.testing.assert_close(new, old.detach() - x["eta"][0, 0, 0] * g, rtol=0, atol=1e-12)


def test_self_values_by_hand() -> None:
    """Linear memory, L2, plain GD, C = 2: targets are `W_c v` at the chunk start (Eq. 91)."""
    spec = MemorySpec(kind="linear", dgd=False, momentum=False, decay=False, self_values=True)
    w0 = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    k = _seq((1.0, 0.0), (0.0, 1.0))
    v = _seq((0.0, 1.0), (1.0, 1.0))
    eta = torch.full((1, 2, 1), 0.5, dtype=torch.float64)
    _, st = memory_chunk(k, k, v, eta, state=_linear_state(w0.tolist()), spec=spec, chunk_size=2)
    want = w0.clone()
    for t in range(2):
        kt, vt = k[0, t, 0], v[0, t, 0]
        want = want - 0.5 * torch.outer(w0 @ kt - w0 @ vt, kt)  # gradient and target both at W_0
    torch.testing.assert_close(st.weights[0][0, 0], want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_sequences_independent(fn) -> None:
    """Changing one sequence's data changes no other sequence's output or final state (D1)."""
    spec = MemorySpec(kind="mlp")
    x = make_inputs(spec, B=3, T=20, H=2, D=8)
    o, st = run(fn, x, spec, 4)
    y = dict(x)
    for name in ("q", "k", "v", "eta", "alpha", "beta"):
        t = x[name].clone()
        t[1] = t[1].flip(0)
        y[name] = t
    o2, st2 = run(fn, y, spec, 4)
    keep = [0, 2]
    assert torch.equal(o[keep], o2[keep])
    assert not torch.allclose(o[1], o2[1])
    for a, b in zip(st.weights + st.momenta, st2.weights + st2.momenta, strict=True):
        assert torch.equal(a[keep], b[keep])


# ---------------------------------------------------------------------------------------------
# closed forms computed by hand


def _linear_state(w: list[list[float]]) -> MemoryState:
    W = torch.tensor(w, dtype=torch.float64)[None, None]
    return MemoryState((W,), (torch.zeros_like(W),))


def _seq(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)[None, :, None, :]  # [1, T, 1, D]


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_classic_delta_rule_by_hand(fn) -> None:
    """Linear memory, L2, plain GD, no momentum, no decay, C = 1: W <- W - eta (W k - v) k^T."""
    spec = MemorySpec(kind="linear", dgd=False, momentum=False, decay=False)
    k = _seq((1.0, 0.0), (0.0, 1.0))
    v = _seq((1.0, 2.0), (3.0, -1.0))
    q = _seq((1.0, 0.0), (0.6, 0.8))
    eta = torch.tensor([[[0.5], [1.0]]], dtype=torch.float64)
    o, st = fn(q, k, v, eta, state=_linear_state([[0, 0], [0, 0]]), spec=spec, chunk_size=1)
    # token 1: W = 0.5 v1 k1^T = [[0.5, 0], [1, 0]]; read at (1, 0) -> (0.5, 1)
    # token 2: W k2 = 0, so W += v2 k2^T -> [[0.5, 3], [1, -1]]; read at (0.6, 0.8) -> (2.7, -0.2)
    torch.testing.assert_close(o[0, :, 0], torch.tensor([[0.5, 1.0], [2.7, -0.2]], dtype=torch.float64))
    torch.testing.assert_close(st.weights[0][0, 0], torch.tensor([[0.5, 3.0], [1.0, -1.0]], dtype=torch.float64))


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_dgd_step_by_hand(fn) -> None:
    """Eq. 88, one token: W <- W (alpha I - eta k k^T) - eta (W k - v) k^T, with alpha = 1, W = I."""
    spec = MemorySpec(kind="linear", momentum=False)
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    o, st = fn(
        _seq((1.0, 1.0)),
        _seq((1.0, 0.0)),
        _seq((0.0, 1.0)),
        0.5 * one,
        one,
        state=_linear_state([[1, 0], [0, 1]]),
        spec=spec,
        chunk_size=1,
    )
    # W (I - 0.5 e1 e1^T) = diag(0.5, 1); W k - v = (1, -1); minus 0.5 (1, -1) e1^T -> [[0, 0], [0.5, 1]]
    want = torch.tensor([[0.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(st.weights[0][0, 0], want, rtol=0, atol=1e-9)
    torch.testing.assert_close(o[0, 0, 0], torch.tensor([0.0, 1.5], dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_frozen_chunk_gradient_by_hand(fn) -> None:
    """C = 2: both tokens' gradients are taken at the chunk-start W (Eq. 91), unlike C = 1."""
    spec = MemorySpec(kind="linear", dgd=False, momentum=False, decay=False)
    k = _seq((1.0, 0.0), (1.0, 0.0))
    v = _seq((2.0, 4.0), (2.0, 4.0))
    eta = torch.full((1, 2, 1), 0.5, dtype=torch.float64)
    zero = _linear_state([[0, 0], [0, 0]])
    _, frozen = fn(k, k, v, eta, state=zero, spec=spec, chunk_size=2)
    _, online = fn(k, k, v, eta, state=zero, spec=spec, chunk_size=1)
    # frozen: W = 0.5 v k^T + 0.5 v k^T = v k^T; online: 0.5 v k^T, then + 0.5 (v - 0.5 v) k^T = 0.75 v k^T
    vk = torch.tensor([[2.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(frozen.weights[0][0, 0], vk)
    torch.testing.assert_close(online.weights[0][0, 0], 0.75 * vk)


# ---------------------------------------------------------------------------------------------
# precision and robustness


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_against_fp64(kind: str, dtype: torch.dtype, tol: float) -> None:
    """Stated tolerances (relative RMS error of outputs): fp32 <= 1e-5, bf16 inputs <= 3e-2.

    The fast weights stay float32 in both cases (D8); bf16 only rounds the inputs and outputs.
    """
    spec = MemorySpec(kind=kind)
    x = make_inputs(spec, B=2, T=100, H=2, D=16)
    ref, ref_st = run(memory_naive, x, spec, 16)
    y = {n: (t.to(dtype) if t is not None and n != "state" else t) for n, t in x.items()}
    y["state"] = x["state"].map(torch.Tensor.float)
    out, st = run(memory_chunk, y, spec, 16)
    assert out.dtype == dtype and all(w.dtype == torch.float32 for w in st.weights)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(out, ref) <= tol
    assert rel(st.weights[0], ref_st.weights[0]) <= tol


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_extreme_gates_no_nan(fn, kind: str) -> None:
    """Gates exactly at 0 and 1, and all-zero keys, give finite outputs and gradients."""
    spec = MemorySpec(kind=kind)
    x = make_inputs(spec, B=2, T=20, H=2, D=8, dtype=torch.float32)
    x["state"] = x["state"].map(torch.Tensor.float)
    g = torch.Generator().manual_seed(5)
    for name in ("eta", "alpha", "beta"):
        x[name] = torch.randint(0, 2, x[name].shape, generator=g).float()
    x["k"][:, 3] = 0.0
    x["alpha"][0] = 0.0
    x["beta"][1] = 1.0
    out, grads = outputs_and_grads(fn, x, spec, 4)
    for t in out + grads:
        assert torch.isfinite(t).all()


# ---------------------------------------------------------------------------------------------
# subnormal floats in the carried state (CPU, float32)

TINY32 = torch.finfo(torch.float32).tiny


def subnormal_fraction(st: MemoryState) -> float:
    ts = [t for t in st.weights + st.momenta + st.anchor]
    return sum(int(((t.abs() > 0) & (t.abs() < TINY32)).sum()) for t in ts) / sum(t.numel() for t in ts)


def _decaying_inputs(T: int) -> dict:
    """A float32 memory whose retention gate (0.9) erases it within a few hundred tokens: its gradients are
    proportional to its weights (`silu(0) = 0`), so the weights decay geometrically into the subnormal range."""
    spec = MemorySpec(kind="mlp", self_values=True)
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(1, T, 2, 8, generator=g), dim=-1)
    gates = dict(eta=torch.full((1, T, 2), 0.025), alpha=torch.full((1, T, 2), 0.9), beta=torch.full((1, T, 2), 0.5))
    return dict(q=u, k=u, v=u, **gates, state=init_state(spec, 1, 2, 8, generator=g))


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_carried_state_holds_no_subnormals(fn, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the flush half of the carried state is subnormal after 1,024 tokens (round to nearest
    keeps the smallest subnormals fixed under a decay by more than 1/2 per step: alpha = 0.9 per token, 0.9^4 per
    chunk), with it none is at a chunk boundary; the outputs are unchanged (the flushed values are below 1.2e-38),
    and pieces split inside chunks are flushed at the same boundaries as one call."""
    import nestlearn.ops.memory.common as common

    x = _decaying_inputs(T=1024)
    spec = MemorySpec(kind="mlp", self_values=True)
    monkeypatch.setattr(common, "FLUSH_SUBNORMALS", False)
    o_old, st_old = run(fn, x, spec, 4)
    assert subnormal_fraction(st_old) > 0.25
    monkeypatch.setattr(common, "FLUSH_SUBNORMALS", True)
    o_new, st_new = run(fn, x, spec, 4)
    assert subnormal_fraction(st_new) == 0.0
    assert torch.equal(o_new, o_old)
    st = x["state"]
    for lo, hi in ((0, 333), (333, 1021), (1021, 1024)):  # splits inside chunks: flushed at the same boundaries
        _, st = run(fn, _slice(x, lo, hi, st), spec, 4)
    assert subnormal_fraction(st) == 0.0
    for a, b in zip(st.weights + st.momenta, st_new.weights + st_new.momenta, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-30)


def test_flush_leaves_float64_alone() -> None:
    """The float64 reference path is never flushed (its subnormals are the exact values)."""
    from nestlearn.ops.memory.common import flush_subnormals

    t64 = torch.tensor([1e-310, 1e-40, 1.0], dtype=torch.float64)
    t32 = torch.tensor([1e-40, -1e-39, 1e-37, float("nan"), float("inf")], dtype=torch.float32)
    assert flush_subnormals([t64])[0] is t64
    out = flush_subnormals([t32])[0]
    assert out[:2].eq(0).all() and out[2] == t32[2] and out[3].isnan() and out[4].isinf()


# ---------------------------------------------------------------------------------------------
# bad input


def _bad(fn, x: dict, spec: MemorySpec, match: str, C: int = 4, **changes) -> None:
    y = dict(x, **changes)
    with pytest.raises(ValueError, match=match):
        fn(
            y["q"],
            y["k"],
            y["v"],
            y["eta"],
            y["alpha"],
            y["beta"],
            state=y["state"],
            spec=spec,
            chunk_size=C,
            check_gates=True,
        )


@pytest.mark.parametrize("fn", [memory_naive, memory_chunk])
def test_bad_input(fn) -> None:
    spec = MemorySpec(kind="mlp")
    x = make_inputs(spec, B=2, T=10, H=2, D=8)
    _bad(fn, x, spec, "chunk_size", C=0)
    _bad(fn, x, spec, "chunk_size", C=-3)
    _bad(fn, x, spec, "^k must have the shape", k=x["k"][:, :5])
    _bad(fn, x, spec, "^q must be", q=x["q"][0])
    _bad(fn, x, spec, "v must be a floating", v=x["v"].long())
    _bad(fn, x, spec, "^eta must be", eta=x["eta"][..., None])
    _bad(fn, x, spec, r"alpha must lie in \[0, 1\]", alpha=x["alpha"] + 1)
    _bad(fn, x, spec, r"eta must lie in \[0, 1\]", eta=-x["eta"])
    _bad(fn, x, spec, r"beta must lie in \[0, 1\]", beta=torch.full_like(x["beta"], float("nan")))
    _bad(fn, x, spec, "beta is required", beta=None)
    other = init_state(MemorySpec(kind="linear"), 2, 2, 8, dtype=torch.float64)
    _bad(fn, x, spec, "another memory configuration", state=other)
    wide = init_state(MemorySpec(kind="mlp", expansion=2), 2, 2, 8, dtype=torch.float64)
    _bad(fn, x, spec, "another configuration", state=wide)
    half = MemoryState(tuple(w.half() for w in x["state"].weights), x["state"].momenta)
    _bad(fn, x, spec, "float32 or float64", state=half)
    _bad(fn, x, dataclasses.replace(spec, momentum=False), "beta was given")
    st = x["state"]
    _bad(fn, x, spec, "state.offset must be", C=4, state=MemoryState(st.weights, st.momenta, st.weights, 4))
    _bad(fn, x, spec, "needs state.anchor", C=4, state=MemoryState(st.weights, st.momenta, (), 2))


def test_bad_spec() -> None:
    with pytest.raises(ValueError, match="kind"):
        MemorySpec(kind="conv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out_norm needs kind='mlp'"):
        MemorySpec(kind="linear", out_norm=True)
    with pytest.raises(ValueError, match="expansion"):
        MemorySpec(expansion=0)
    with pytest.raises(ValueError, match="objective"):
        MemorySpec(objective="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        MemorySpec(max_grad_norm=0.0)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cuda_matches_cpu_reference(kind: str) -> None:
    """On the GPU: fp64 chunk == fp64 naive on CPU to 1e-10; fp32 within 1e-4 relative (TF32 off)."""
    spec = MemorySpec(kind=kind)
    x = make_inputs(spec, B=2, T=100, H=2, D=16)
    ref, _ = run(memory_naive, x, spec, 16)
    cuda = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in x.items()}
    cuda["state"] = x["state"].map(torch.Tensor.cuda)
    out, _ = run(memory_chunk, cuda, spec, 16)
    assert (out.cpu() - ref).abs().max().item() <= FP64_TOL * max(1.0, ref.abs().max().item())
    f32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in cuda.items()}
    f32["state"] = cuda["state"].map(torch.Tensor.float)
    out32, _ = run(memory_chunk, f32, spec, 16)
    assert ((out32.cpu().double() - ref).norm() / ref.norm()).item() <= 1e-4
