"""Chunk-parallel form of the deep-memory op (same signature and semantics as `naive.memory_naive`).

What this is: the training and inference path in pure PyTorch. Within a chunk, every token's inner gradient
is taken at the chunk-start state (D5, Eq. 91), so each weight matrix follows a recurrence that is linear in
the weights; it is solved for the whole chunk at once with masked matrix products and one unit-triangular
system (the UT/WY structure of DeltaNet). Only the loop over chunks is sequential. The derivation is in
`README.md` beside this file.
What it is not: a fused kernel. Each chunk still costs a few dozen kernel launches; a later Triton kernel
keeps the state on chip.

Index conventions inside a chunk of `n` tokens (tokens 1..n, 0 = the chunk start):
    P_a[t, s] = prod_{s<r<=t} alpha_r,  P_b[t, s] = prod_{s<r<=t} beta_r   (s <= t, else 0), [n+1, n+1]
    Γ_t = P_a[t, 0],   R[t, r] = P_a[t, r],   b_t = P_b[t, 0],   Lβ[t, s] = P_b[t, s]
    D = R Lβ [n+1, n]  (row 0 = 0),   m = R b [n+1]  (m_0 = 0)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .common import MemorySpec, MemoryState, activation, check_inputs, compute_dtype, normalize, output_grad


def memory_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    alpha: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    state: MemoryState,
    spec: MemorySpec,
    chunk_size: int = 64,
    check_gates: bool = False,
) -> tuple[Tensor, MemoryState]:
    """Run the memory over a sequence chunk by chunk; arguments and results as `memory_naive`.

    Shapes: q, k, v `[B, T, H, D]`; eta, alpha, beta `[B, T, H]`; state weights `[B, H, d_out, d_in]`.
    T need not be a multiple of chunk_size: the last chunk is padded with inert tokens and the final
    state is read at the last real token.
    """
    alpha, beta = check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    dt, out_dtype = compute_dtype(q, k, v, *state.weights), q.dtype
    B, T, H, D = q.shape
    n = min(chunk_size, T)
    N = -(-T // n)
    pad = N * n - T
    q, k, v = (_vector_chunks(x.to(dt), n, pad) for x in (q, k, v))  # [B, H, N, n, D]
    # inert padding: eta = 0 writes nothing; alpha = beta = 1 leave rows <= the last real token untouched
    eta, alpha, beta = (_gate_chunks(g.to(dt), n, pad, fill) for g, fill in ((eta, 0), (alpha, 1), (beta, 1)))
    coef = _coefficients(eta, alpha, beta)  # all chunks at once: state-independent
    kh = normalize(k, spec.norm_eps)
    key_gram = _grams(k, kh, q, coef, spec.dgd, invert=True)  # the key-input weight's grams, all chunks
    weights = [w.to(dt) for w in state.weights]
    momenta = [s.to(dt) for s in state.momenta]
    outputs = []
    for j in range(N):
        end = n if j < N - 1 else T - (N - 1) * n
        c, g = coef.select(j), key_gram.select(j)
        chunk = (q[:, :, j], k[:, :, j], kh[:, :, j], v[:, :, j])
        if spec.kind == "linear":
            o = _linear_chunk(weights, momenta, chunk, c, g, end, spec)
        else:
            o = _mlp_chunk(weights, momenta, chunk, c, g, end, spec)
        outputs.append(o)
    o = torch.stack(outputs, dim=2).reshape(B, H, N * n, D)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), MemoryState(tuple(weights), tuple(momenta))


# ---------------------------------------------------------------------------------------------
# per-chunk steps of the two memories (they update `weights`/`momenta` in place, as lists)


def _linear_chunk(
    weights: list[Tensor], momenta: list[Tensor], chunk: tuple[Tensor, ...], c: _Coef, g: _Gram,
    end: int, spec: MemorySpec,
) -> Tensor:
    """`M(x) = W x`: frozen error `E_s = -eta_s dl/dy(W_c k_s)` (Eq. 93), then one matrix chunk."""
    q, k, kh, v = chunk
    (w,), (s,) = weights, momenta
    e = -c.eta[..., None] * output_grad(k @ w.mT, v, spec.objective)
    o, weights[0], momenta[0] = _matrix_chunk(w, s, k, kh, e, q, c, g, end, spec.dgd)
    return o


def _mlp_chunk(
    weights: list[Tensor], momenta: list[Tensor], chunk: tuple[Tensor, ...], c: _Coef, g: _Gram,
    end: int, spec: MemorySpec,
) -> Tensor:
    """`M(x) = x + W1 σ(W2 x)` (Eq. 89): both layers' errors frozen at the chunk start, reads chained.

    W2 sees the keys and is read at q; W1 sees the chunk-start hidden activations and is read at
    σ(W2_t q_t), so only W1's grams depend on the state.
    """
    q, k, kh, v = chunk
    (w1, w2), (s1, s2) = weights, momenta
    sigma, dsigma = activation(spec.activation)
    z = k @ w2.mT  # [B, H, n, e]
    h = sigma(z)
    r = output_grad(k + h @ w1.mT, v, spec.objective)
    step = -c.eta[..., None]
    e1, e2 = step * r, step * (r @ w1) * dsigma(z)  # -eta dl/dy and -eta dl/dz
    z_read, weights[1], momenta[1] = _matrix_chunk(w2, s2, k, kh, e2, q, c, g, end, spec.dgd)
    a = sigma(z_read)
    hh = normalize(h, spec.norm_eps)
    g1 = _grams(h, hh, a, c, spec.dgd, invert=False)
    o1, weights[0], momenta[0] = _matrix_chunk(w1, s1, h, hh, e1, a, c, g1, end, spec.dgd)
    return q + o1


# ---------------------------------------------------------------------------------------------
# one weight matrix over one chunk


def _matrix_chunk(
    w: Tensor, s: Tensor, x: Tensor, xh: Tensor, e: Tensor, q: Tensor, c: _Coef, g: _Gram, end: int,
    dgd: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reads `W_t q_t` for t = 1..n and the state `(W, S)` after token `end`.

    Shapes: w, s `[B, H, o, i]`; x, xh, q `[B, H, n, i]`; e `[B, H, n, o]`. With `u_r = -eta_r W_{r-1} x̂_r`:
        W_t = Γ_t W_c + m_t S_c + sum_r R[t, r] u_r x̂_r^T + sum_s D[t, s] E_s x_s^T
        S_t = b_t S_c + sum_s Lβ[t, s] E_s x_s^T
    and the `u` solve `(I + diag(eta) (R_prev ⊙ X̂ X̂^T)) U = -eta ⊙ (Γ_prev X̂ W_c^T + m_prev X̂ S_c^T
    + (D_prev ⊙ X̂ X^T) E)`, where `_prev` rows are those of token r-1.
    """
    pa, pb, d, m = c.pa, c.pb, c.d, c.m
    wt, st = w.mT, s.mT
    read = pa[..., 1:, 0, None] * (q @ wt) + m[..., 1:, None] * (q @ st) + g.qx @ e
    w_end = _scale(pa[..., end, 0], w) + _scale(m[..., end], s) + (e * d[..., end, :, None]).mT @ x
    if dgd:
        rhs = pa[..., :-1, 0, None] * (xh @ wt) + m[..., :-1, None] * (xh @ st) + g.xx @ e
        rhs = -c.eta[..., None] * rhs
        if g.inv is not None:
            u = g.inv @ rhs
        else:
            u = torch.linalg.solve_triangular(g.system, rhs, upper=False, unitriangular=True)
        read = read + g.qxh @ u
        w_end = w_end + (u * pa[..., end, 1:, None]).mT @ xh
    s_end = _scale(pb[..., end, 0], s) + (e * pb[..., end, 1:, None]).mT @ x
    return read, w_end, s_end


def _scale(a: Tensor, w: Tensor) -> Tensor:
    """`a [B, H] * w [B, H, o, i]`."""
    return a[..., None, None] * w


# ---------------------------------------------------------------------------------------------
# state-independent coefficients and grams


class _Coef(NamedTuple):
    """Gate products of each chunk (see the module docstring); leading dims `[B, H]` (+ `[N]`)."""

    eta: Tensor  # [..., n]
    pa: Tensor  # [..., n+1, n+1]  decay products
    pb: Tensor  # [..., n+1, n+1]  momentum products
    d: Tensor  # [..., n+1, n]    D = R Lβ
    m: Tensor  # [..., n+1]       m = R b

    def select(self, j: int) -> _Coef:
        return _Coef(*(f[:, :, j] for f in self))


class _Gram(NamedTuple):
    """Masked inner products of one weight's inputs; `[..., n, n]` each."""

    qx: Tensor  # D ⊙ (Q X^T)
    qxh: Tensor | None  # R ⊙ (Q X̂^T)                       (dgd only)
    xx: Tensor | None  # D_prev ⊙ (X̂ X^T)                   (dgd only)
    system: Tensor | None  # I + diag(eta) (R_prev ⊙ X̂ X̂^T)  (dgd only; unit lower triangular)
    inv: Tensor | None  # its inverse, when precomputed

    def select(self, j: int) -> _Gram:
        return _Gram(*(None if f is None else f[:, :, j] for f in self))


def _coefficients(eta: Tensor, alpha: Tensor, beta: Tensor) -> _Coef:
    """Decay and momentum products for gates `[..., n]` (all chunks at once)."""
    pa, pb = _segment_products(alpha), _segment_products(beta)
    ra = pa[..., :, 1:]  # R with the chunk-start row: [n+1, n]
    d = ra @ pb[..., 1:, 1:]  # D[t, s] = sum_r R[t, r] Lβ[r, s]
    m = (ra @ pb[..., 1:, 0, None])[..., 0]  # m_t = sum_r R[t, r] b_r
    return _Coef(eta, pa, pb, d, m)


def _segment_products(g: Tensor) -> Tensor:
    """`P[..., t, s] = prod_{s<r<=t} g_r` for `0 <= s <= t <= n` (tokens 1-indexed), 0 above the diagonal.

    Built by a cumulative product, with no division, so gates of exactly 0 are fine.
    """
    n = g.shape[-1]
    g1 = torch.cat([torch.ones_like(g[..., :1]), g], dim=-1)  # [..., n+1]; index 0 unused
    idx = torch.arange(n + 1, device=g.device)
    after = idx[None, :] > idx[:, None]  # [s, t]: t > s
    factors = torch.where(after, g1[..., None, :], torch.ones_like(g1[..., None, :]))
    prods = torch.cumprod(factors, dim=-1).transpose(-1, -2)  # [t, s]
    return prods.masked_fill(after, 0)  # in [t, s] layout `after` marks s > t


def _grams(x: Tensor, xh: Tensor, q: Tensor, c: _Coef, dgd: bool, invert: bool) -> _Gram:
    """Masked grams of a weight's inputs `x, x̂ [..., n, i]` and read inputs `q [..., n, i]`."""
    qx = c.d[..., 1:, :] * (q @ x.mT)
    if not dgd:
        return _Gram(qx, None, None, None, None)
    qxh = c.pa[..., 1:, 1:] * (q @ xh.mT)
    xx = c.d[..., :-1, :] * (xh @ x.mT)
    strict = c.pa[..., :-1, 1:] * (xh @ xh.mT)  # R[r-1, j] x̂_j^T x̂_r, zero for j >= r
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    system = eye + c.eta[..., None] * strict
    inv = None
    if invert:
        inv = torch.linalg.solve_triangular(system, eye.expand_as(system), upper=False, unitriangular=True)
    return _Gram(qx, qxh, xx, system, inv)


# ---------------------------------------------------------------------------------------------
# layout


def _vector_chunks(x: Tensor, n: int, pad: int) -> Tensor:
    """`[B, T, H, D] -> [B, H, N, n, D]`, zero-padded at the end."""
    x = torch.nn.functional.pad(x.transpose(1, 2), (0, 0, 0, pad))
    B, H, T, D = x.shape
    return x.reshape(B, H, T // n, n, D)


def _gate_chunks(g: Tensor, n: int, pad: int, fill: float) -> Tensor:
    """`[B, T, H] -> [B, H, N, n]`, padded with `fill`."""
    g = torch.nn.functional.pad(g.transpose(1, 2), (0, pad), value=fill)
    B, H, T = g.shape
    return g.reshape(B, H, T // n, n)
