"""Chunk-parallel form of the deep-memory op (same signature and semantics as `naive.memory_naive`).

What this is: the training and inference path in pure PyTorch. Within a chunk, every token's inner gradient
is taken at the chunk-start state (D5, Eq. 91), so each weight matrix follows a recurrence that is linear in
the weights; it is solved for the whole chunk at once with masked matrix products and one unit-triangular
system (the UT/WY structure of DeltaNet). Only the loop over chunks is sequential. The derivation is in
`README.md` beside this file.
Two paths, the same math: the weight whose input is the key (`W`, or `W2` of the MLP) has state-independent
grams, so its whole chunk is one precomputed linear operator applied to `[W_c^T; S_c^T; E]` (one matmul per
chunk); the MLP's `W1` sees chunk-start hidden activations, so its grams are built inside the chunk loop.
What it is not: a fused kernel. Each chunk costs a few dozen kernel launches, and the state goes through global
memory between them (docs/results/memory_op.md measures the cost).

Index conventions inside a chunk of `n` tokens (tokens 1..n, 0 = the chunk start):
    P_a[t, s] = prod_{s<r<=t} alpha_r,  P_b[t, s] = prod_{s<r<=t} beta_r   (s <= t, else 0), [n+1, n+1]
    Γ_t = P_a[t, 0],   R[t, r] = P_a[t, r],   b_t = P_b[t, 0],   Lβ[t, s] = P_b[t, s]
    D = R Lβ [n+1, n]  (row 0 = 0),   m = R b [n+1]  (m_0 = 0)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .common import (
    MemorySpec,
    MemoryState,
    activation,
    branch_norm,
    branch_norm_grad,
    check_inputs,
    clip_factor,
    compute_dtype,
    flush_subnormals,
    memory_apply,
    normalize,
    output_grad,
)


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
    chunk_size: int,
    check_gates: bool = False,
) -> tuple[Tensor, MemoryState]:
    """Run the memory over a sequence chunk by chunk; arguments and results as `memory_naive`.

    Shapes: q, k, v `[B, T, H, D]`; eta, alpha, beta `[B, T, H]`; state weights `[B, H, d_out, d_in]`.
    T need not be a multiple of chunk_size: the last chunk is padded with inert tokens and the final
    state is read at the last real token.
    """
    alpha, beta = check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    dt, out_dtype = compute_dtype(q, k, v, eta, *state.weights, *state.momenta), q.dtype
    seq = [x.to(dt) for x in (q, k, v, eta, alpha, beta)]
    weights = [w.to(dt) for w in state.weights]
    momenta = [s.to(dt) for s in state.momenta]
    T = q.shape[1]
    head = min((chunk_size - state.offset) % chunk_size, T)  # tokens that finish a chunk an earlier call opened
    parts = []
    offset = (state.offset + T) % chunk_size
    if head > 0:
        frozen = [w.to(dt) for w in state.anchor]
        ends = (state.offset + head) % chunk_size == 0
        o, anchor = _run([x[:, :head] for x in seq], weights, momenta, frozen, head, spec, ends)
        parts.append(o)
    if head < T:
        o, anchor = _run([x[:, head:] for x in seq], weights, momenta, None, chunk_size, spec, offset == 0)
        parts.append(o)
    o = torch.cat(parts, dim=1).to(out_dtype)
    return o, MemoryState(tuple(weights), tuple(momenta), tuple(anchor if offset else weights), offset)


def _run(
    seq: list[Tensor],
    weights: list[Tensor],
    momenta: list[Tensor],
    frozen: list[Tensor] | None,
    C: int,
    spec: MemorySpec,
    ends_at_boundary: bool,
) -> tuple[Tensor, list[Tensor]]:
    """Chunks of size C from the start of `seq = (q, k, v, eta, alpha, beta)`; updates `weights`, `momenta`.

    `frozen` replaces the first chunk's start weights for its gradients (a chunk an earlier call opened).
    At every chunk boundary the state is flushed of subnormal floats (CPU float32 only, `flush_subnormals`);
    `ends_at_boundary` says whether the last chunk ends at one (else it ends inside a chunk: a later call goes on).
    Returns `o [B, T, H, D]` and the start weights of the last chunk (the next call's anchor).
    """
    B, T, H, D = seq[0].shape
    q, k, v, coef = chunk_layout(seq, C)
    N, n = q.shape[2:4]
    key_op = _key_operator(k, normalize(k, spec.norm_eps), q, coef, spec.dgd)
    coefs, key_ops = coef.per_chunk(), key_op.per_chunk()
    qs, ks, vs = q.unbind(2), k.unbind(2), v.unbind(2)
    outputs = []
    for j in range(N):
        start = frozen if (j == 0 and frozen is not None) else list(weights)
        if spec.kind == "linear":
            o = _linear_chunk(weights, momenta, start, ks[j], vs[j], coefs[j], key_ops[j], spec)
        else:
            o = _mlp_chunk(weights, momenta, start, (qs[j], ks[j], vs[j]), coefs[j], key_ops[j], spec)
        outputs.append(o)
        if j < N - 1 or ends_at_boundary:
            weights[:], momenta[:] = flush_subnormals(weights), flush_subnormals(momenta)
    o = torch.stack(outputs, dim=2).reshape(B, H, N * n, D)[:, :, :T]
    return o.transpose(1, 2), start


# ---------------------------------------------------------------------------------------------
# per-chunk steps of the two memories (they replace `weights`/`momenta` entries in place)


def _linear_chunk(
    weights: list[Tensor],
    momenta: list[Tensor],
    start: list[Tensor],
    k: Tensor,
    v: Tensor,
    c: _Coef,
    op: _KeyOp,
    spec: MemorySpec,
) -> Tensor:
    """`M(x) = W x`: frozen error `E_s = -eta_s dl/dy(W_c k_s)` at the chunk start (Eq. 93), then the operator."""
    v = _targets(start, v, spec)
    g = output_grad(k @ start[0].mT, v, spec.objective)
    e = _step(c, spec, (g, k)) * g
    o, weights[0], momenta[0] = _apply_key_operator(op, c, weights[0], momenta[0], e, spec.dgd)
    return o


def _mlp_chunk(
    weights: list[Tensor],
    momenta: list[Tensor],
    start: list[Tensor],
    chunk: tuple[Tensor, Tensor, Tensor],
    c: _Coef,
    op: _KeyOp,
    spec: MemorySpec,
) -> Tensor:
    """`M(x) = x + W1 σ(W2 x)` (Eq. 89): both layers' errors frozen at the chunk start, reads chained.

    W2 sees the keys and is read at q (precomputed operator); W1 sees the chunk-start hidden
    activations and is read at σ(W2_t q_t), so its grams are built here. `start` holds the chunk-start
    weights the errors are taken at; the recurrence runs from the current `weights`.
    """
    q, k, v = chunk
    (w1, w2), (s1, s2), (f1, f2) = weights, momenta, start
    v = _targets(start, v, spec)
    sigma, dsigma = activation(spec.activation)
    z = k @ f2.mT  # [B, H, n, e]
    h = sigma(z)
    a = h @ f1.mT
    r = branch_norm_grad(a, output_grad(k + branch_norm(a, spec), v, spec.objective), spec)  # dl/da
    back = (r @ f1) * dsigma(z)  # dl/dz
    step = _step(c, spec, (r, h), (back, k))
    e1, e2 = step * r, step * back  # -eta dl/da and -eta dl/dz
    z_read, weights[1], momenta[1] = _apply_key_operator(op, c, w2, s2, e2, spec.dgd)
    o1, weights[0], momenta[0] = _matrix_chunk(w1, s1, h, normalize(h, spec.norm_eps), e1, sigma(z_read), c, spec.dgd)
    return q + branch_norm(o1, spec)


def _step(c: _Coef, spec: MemorySpec, *layers: tuple[Tensor, Tensor]) -> Tensor:
    """`-eta_t`, times the clip factor of `G_t` when clipping: `||G_t||^2 = sum ||g||^2 ||x||^2` over the
    `(g, x)` pairs of `dl/dW = g x^T`. -> `[B, H, n, 1]`."""
    if spec.max_grad_norm is None:
        return -c.eta[..., None]
    sq = sum((g * g).sum(-1) * (x * x).sum(-1) for g, x in layers)
    return -(c.eta * clip_factor(sq, spec))[..., None]


def _targets(start: list[Tensor], v: Tensor, spec: MemorySpec) -> Tensor:
    """The inner targets: `v`, or the self-generated `M_{chunk start}(v)` (Eqs. 84, 91)."""
    return memory_apply(start, v, spec) if spec.self_values else v


# ---------------------------------------------------------------------------------------------
# one weight matrix over one chunk, direct form (inputs known only inside the loop)


def _matrix_chunk(
    w: Tensor, s: Tensor, x: Tensor, xh: Tensor, e: Tensor, q: Tensor, c: _Coef, dgd: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Reads `W_t q_t` for t = 1..n and the state `(W, S)` after the chunk's last real token.

    Shapes: w, s `[B, H, o, i]`; x, xh, q `[B, H, n, i]`; e `[B, H, n, o]`. With `u_r = -eta_r W_{r-1} x̂_r`:
        W_t = Γ_t W_c + m_t S_c + sum_r R[t, r] u_r x̂_r^T + sum_s D[t, s] E_s x_s^T
        S_t = b_t S_c + sum_s Lβ[t, s] E_s x_s^T
    and the `u` solve `(I + diag(eta) (R_prev ⊙ X̂ X̂^T)) U = -eta ⊙ (Γ_prev X̂ W_c^T + m_prev X̂ S_c^T
    + (D_prev ⊙ X̂ X^T) E)`, where `_prev` rows are those of token r-1.
    """
    wt, st = w.mT, s.mT
    read = c.gam[..., None] * (q @ wt) + c.m[..., None] * (q @ st) + (c.D * (q @ x.mT)) @ e
    w_end, s_end = _carried(c, wt, st)
    w_end = w_end + (x.mT * c.D_e[..., None, :]) @ e
    if dgd:
        rhs = c.gam_prev[..., None] * (xh @ wt) + c.m_prev[..., None] * (xh @ st) + (c.D_prev * (xh @ x.mT)) @ e
        u = torch.linalg.solve_triangular(_system(xh, c), -c.eta[..., None] * rhs, upper=False, unitriangular=True)
        read = read + (c.R * (q @ xh.mT)) @ u
        w_end = w_end + (xh.mT * c.R_e[..., None, :]) @ u
    s_end = s_end + (x.mT * c.Lb_e[..., None, :]) @ e
    return read, w_end.mT, s_end.mT


def _system(xh: Tensor, c: _Coef) -> Tensor:
    """`I + diag(eta) (R_prev ⊙ X̂ X̂^T)`: unit lower triangular `[..., n, n]` (R_prev is strictly lower)."""
    eye = torch.eye(xh.shape[-2], dtype=xh.dtype, device=xh.device)
    return eye + c.eta[..., None] * (c.R_prev * (xh @ xh.mT))


def _carried(c: _Coef, wt: Tensor, st: Tensor) -> tuple[Tensor, Tensor]:
    """The chunk-start state's share of the chunk-end state: `(Γ_e W_c^T + m_e S_c^T, b_e S_c^T)`."""
    return _scale(c.gam_e, wt) + _scale(c.m_e, st), _scale(c.b_e, st)


def _scale(a: Tensor, w: Tensor) -> Tensor:
    """`a [B, H] * w [B, H, o, i]`."""
    return a[..., None, None] * w


# ---------------------------------------------------------------------------------------------
# the key-input weight: the chunk as one linear operator on Z = [W_c^T; S_c^T; E]


class _KeyOp(NamedTuple):
    """State-independent operator of a chunk whose layer inputs are the keys.

    rows `[2n, 2i+n]` (dgd) maps Z to `[U; reads]`; `[n, 2i+n]` without dgd maps Z to reads.
    pe `[i, 2n]` (dgd) or `[i, n]` maps `[U; E]` (or E) to W's increment; ke `[i, n]` maps E to S's.
    """

    rows: Tensor
    pe: Tensor
    ke: Tensor

    def per_chunk(self) -> list[_KeyOp]:
        return [_KeyOp(*fs) for fs in zip(*(f.unbind(2) for f in self), strict=True)]


def _key_operator(x: Tensor, xh: Tensor, q: Tensor, c: _Coef, dgd: bool) -> _KeyOp:
    """Build the operator for all chunks at once from inputs `x, x̂, q [B, H, N, n, i]`.

    Reads: `Q W_t` rows are `[Γ ⊙ Q | m ⊙ Q | D ⊙ Q X^T] Z + (R ⊙ Q X̂^T) U`, and `U = Mu Z` with
    `Mu = system^{-1} (-eta ⊙ [Γ_prev ⊙ X̂ | m_prev ⊙ X̂ | D_prev ⊙ X̂ X^T])` (see `_matrix_chunk`).
    """
    qx = c.D * (q @ x.mT)
    fq = torch.cat([c.gam[..., None] * q, c.m[..., None] * q, qx], dim=-1)
    ke = x.mT * c.Lb_e[..., None, :]
    if not dgd:
        return _KeyOp(fq, x.mT * c.D_e[..., None, :], ke)
    ax = torch.cat([c.gam_prev[..., None] * xh, c.m_prev[..., None] * xh, c.D_prev * (xh @ x.mT)], dim=-1)
    mu = torch.linalg.solve_triangular(_system(xh, c), -c.eta[..., None] * ax, upper=False, unitriangular=True)
    rows = torch.cat([mu, fq + (c.R * (q @ xh.mT)) @ mu], dim=-2)
    pe = torch.cat([xh.mT * c.R_e[..., None, :], x.mT * c.D_e[..., None, :]], dim=-1)
    return _KeyOp(rows, pe, ke)


def _apply_key_operator(
    op: _KeyOp, c: _Coef, w: Tensor, s: Tensor, e: Tensor, dgd: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Reads `[B, H, n, o]` and the new `(W, S)` from the chunk-start `(W, S)` and errors `e [B, H, n, o]`."""
    wt, st = w.mT, s.mT
    y = op.rows @ torch.cat([wt, st, e], dim=-2)
    n = e.shape[-2]
    if dgd:
        read, ue = y[..., n:, :], torch.cat([y[..., :n, :], e], dim=-2)
    else:
        read, ue = y, e
    w_end, s_end = _carried(c, wt, st)
    w_end, s_end = w_end + op.pe @ ue, s_end + op.ke @ e
    return read, w_end.mT, s_end.mT


# ---------------------------------------------------------------------------------------------
# state-independent gate coefficients


class _Coef(NamedTuple):
    """Gate products of each chunk (module docstring), leading dims `[B, H, N]` or, per chunk, `[B, H]`.

    Rows `t = 1..n`; `_prev` fields are the rows of token t-1 (row 0 = the chunk start); `_e` fields are the
    row of the chunk's last real token (n, or fewer in the final chunk).
    """

    eta: Tensor  # [n]
    gam: Tensor  # [n]     Γ_t
    gam_prev: Tensor  # [n]     Γ_{t-1}
    m: Tensor  # [n]     m_t
    m_prev: Tensor  # [n]     m_{t-1}
    R: Tensor  # [n, n]  R[t, r]
    R_prev: Tensor  # [n, n]  R[t-1, r] (strictly lower)
    D: Tensor  # [n, n]  D[t, s]
    D_prev: Tensor  # [n, n]  D[t-1, s]
    gam_e: Tensor  # []
    m_e: Tensor  # []
    b_e: Tensor  # []
    R_e: Tensor  # [n]
    D_e: Tensor  # [n]
    Lb_e: Tensor  # [n]

    def per_chunk(self) -> list[_Coef]:
        return [_Coef(*fs) for fs in zip(*(f.unbind(2) for f in self), strict=True)]


def _coefficients(eta: Tensor, alpha: Tensor, beta: Tensor, last: int) -> _Coef:
    """Decay and momentum products for gates `[B, H, N, n]` (all chunks at once)."""
    return _coefficients_of(eta, _segment_products(alpha), _segment_products(beta), last)


def _chunk_ends(N: int, n: int, last: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Chunk indices `[N]` and the row of each chunk's last real token (n; `last` in the final chunk)."""
    idx = torch.arange(N, device=device)
    return idx, torch.full((N,), n, device=device) - (n - last) * (idx == N - 1)  # no host-to-device copy


def _coefficients_of(eta: Tensor, pa: Tensor, pb: Tensor, last: int) -> _Coef:
    """`_coefficients` from the segment products `pa, pb [B, H, N, n+1, n+1]` of alpha and beta."""
    N, n = eta.shape[-2:]
    ra = pa[..., :, 1:]  # R with the chunk-start row: [n+1, n]
    d = ra @ pb[..., 1:, 1:]  # D[t, s] = sum_r R[t, r] Lβ[r, s]
    m = (ra @ pb[..., 1:, 0, None])[..., 0]  # m_t = sum_r R[t, r] b_r
    idx, ends = _chunk_ends(N, n, last, eta.device)
    pa_e, pb_e, d_e, m_e = pa[:, :, idx, ends], pb[:, :, idx, ends], d[:, :, idx, ends], m[:, :, idx, ends]
    return _Coef(
        eta=eta,
        gam=pa[..., 1:, 0],
        gam_prev=pa[..., :-1, 0],
        m=m[..., 1:],
        m_prev=m[..., :-1],
        R=pa[..., 1:, 1:],
        R_prev=pa[..., :-1, 1:],
        D=d[..., 1:, :],
        D_prev=d[..., :-1, :],
        gam_e=pa_e[..., 0],
        m_e=m_e,
        b_e=pb_e[..., 0],
        R_e=pa_e[..., 1:],
        D_e=d_e,
        Lb_e=pb_e[..., 1:],
    )


def _segment_products(g: Tensor) -> Tensor:
    """`P[..., t, s] = prod_{s<r<=t} g_r` for `0 <= s <= t <= n` (tokens 1-indexed), 0 above the diagonal.

    Built by a cumulative product, with no division, so gates of exactly 0 are fine. Its backward
    (`_SegmentProducts`) is division-free too and, unlike `torch.cumprod`'s, never reads a value back to the host
    (cumprod's backward asks whether any input is 0), so a CUDA graph can capture it.
    """
    return _SegmentProducts.apply(g)


class _SegmentProducts(torch.autograd.Function):
    """`_segment_products` with the backward `dg_r = sum_{s<r<=t} G[t, s] P[r-1, s] P[t, r]`, which is
    `(P Gᵀ)[r-1, :] · P[:, r]`: the masks of the sum are P's own zeros above the diagonal."""

    @staticmethod
    def forward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        n = g.shape[-1]
        g1 = torch.cat([torch.ones_like(g[..., :1]), g], dim=-1)  # [..., n+1]; index 0 unused
        idx = torch.arange(n + 1, device=g.device)
        after = idx[:, None] > idx[None, :]  # [t, s]: t > s
        factors = torch.where(after, g1[..., :, None], torch.ones_like(g1[..., :, None]))  # [t, s]
        # the running product down t, not along the last dim: CUDA's scan over an outer dim runs one thread per
        # column, its scan over the innermost dim one block-scan per 65-long row (H200, Titans 20M: 0.78 ms a call)
        out = torch.cumprod(factors, dim=-2).masked_fill(after.mT, 0)  # 0 where s > t
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (P,) = ctx.saved_tensors
        return _segment_products_adjoint(P, grad)


def _segment_products_adjoint(P: Tensor, grad: Tensor) -> Tensor:
    """The gates' adjoint `[..., n]` from the products `P` and their adjoint `grad` (`[..., n+1, n+1]` each)."""
    n = P.shape[-1] - 1
    M = P[..., :n, :] @ grad.mT  # [..., r-1, t] = sum_s P[r-1, s] G[t, s]
    return (M * P.mT[..., 1:, :]).sum(-1)


# ---------------------------------------------------------------------------------------------
# layout


def chunk_layout(seq: list[Tensor] | tuple[Tensor, ...], C: int) -> tuple[Tensor, Tensor, Tensor, _Coef]:
    """`seq = (q, k, v, eta, alpha, beta)` in `N` chunks of `n = min(C, T)` tokens: q, k, v `[B, H, N, n, D]` and
    every chunk's gate products (state-independent, all at once). The last chunk is padded with inert tokens
    (eta = 0 writes nothing, alpha = beta = 1) and its chunk-end rows are those of its last real token."""
    q, k, v, coef, _ = chunk_layout_products(seq, C)
    return q, k, v, coef


def chunk_layout_products(
    seq: list[Tensor] | tuple[Tensor, ...], C: int
) -> tuple[Tensor, Tensor, Tensor, _Coef, tuple[Tensor, Tensor]]:
    """`chunk_layout`, and the segment products of alpha and beta `[B, H, N, n+1, n+1]` that its gate products
    come from (what `chunk_layout_adjoint` takes)."""
    q, k, v, eta, alpha, beta = seq
    T = q.shape[1]
    n = min(C, T)
    N = -(-T // n)
    pad = N * n - T
    e, a, b = (_gate_chunks(g, n, pad, fill) for g, fill in ((eta, 0), (alpha, 1), (beta, 1)))
    pa, pb = _segment_products(a), _segment_products(b)
    chunks = (_vector_chunks(x, n, pad) for x in (q, k, v))
    return (*chunks, _coefficients_of(e, pa, pb, last=T - (N - 1) * n), (pa, pb))


def chunk_layout_adjoint(T: int, products: tuple[Tensor, Tensor], dq: Tensor, dk: Tensor, dv: Tensor,
                         dcoef: _Coef) -> list[Tensor]:  # fmt: skip
    """The adjoint of `chunk_layout` over T tokens, written out (no autograd): from the adjoints of the chunked
    q, k, v `[B, H, N, n, D]` and of every gate product field (`_Coef`, `[B, H, N, ...]`) and the forward's segment
    products `(pa, pb)` (`chunk_layout_products`) -> the adjoints of `(q, k, v, eta, alpha, beta)` in their
    `[B, T, H, ...]` shapes."""
    pa, pb = products
    N, n = dcoef.eta.shape[-2:]
    g = dcoef
    dpa, dpb = torch.zeros_like(pa), torch.zeros_like(pb)
    dd = pa.new_zeros(*pa.shape[:-1], n)  # D with the chunk-start row: [n+1, n]
    dm = pa.new_zeros(pa.shape[:-1])  # m: [n+1]
    # each field adds into the slice of the product it was read from (`add_` on the view: no write-back copy)
    dpa[..., 1:, 0].add_(g.gam)
    dpa[..., :-1, 0].add_(g.gam_prev)
    dpa[..., 1:, 1:].add_(g.R)
    dpa[..., :-1, 1:].add_(g.R_prev)
    dd[..., 1:, :].add_(g.D)
    dd[..., :-1, :].add_(g.D_prev)
    dm[..., 1:].add_(g.m)
    dm[..., :-1].add_(g.m_prev)
    idx, ends = _chunk_ends(N, n, T - (N - 1) * n, pa.device)  # the chunk-end rows (unique per chunk)
    for buf, grad in ((dpa, torch.cat([g.gam_e[..., None], g.R_e], dim=-1)), (dd, g.D_e), (dm, g.m_e),
                      (dpb, torch.cat([g.b_e[..., None], g.Lb_e], dim=-1))):  # fmt: skip
        _add_at_rows(buf, idx, ends, grad)
    # d = R Lβ and m = R b, R = pa[..., :, 1:] (with the chunk-start row), Lβ = pb[..., 1:, 1:], b = pb[..., 1:, 0]
    ra = pa[..., :, 1:]
    dpa[..., :, 1:].add_(dd @ pb[..., 1:, 1:].mT + dm[..., :, None] * pb[..., None, 1:, 0])
    dpb[..., 1:, 1:].add_(ra.mT @ dd)
    dpb[..., 1:, 0].add_((ra.mT @ dm[..., :, None])[..., 0])
    gates = (g.eta, _segment_products_adjoint(pa, dpa), _segment_products_adjoint(pb, dpb))
    return [_unchunk(x, T) for x in (dq, dk, dv)] + [_unchunk(x[..., None], T)[..., 0] for x in gates]


def _add_at_rows(buf: Tensor, idx: Tensor, rows: Tensor, x: Tensor) -> None:
    """`buf[:, :, idx, rows] += x` as one `index_add_` over the flattened (chunk, row) dim: buf `[B, H, N, R, ...]`
    contiguous, x `[B, H, len(idx), ...]` (the pairs are distinct; no host sync, so a CUDA graph captures it)."""
    B, H, N, R = buf.shape[:4]
    buf.view(B, H, N * R, *buf.shape[4:]).index_add_(2, idx * R + rows, x)


def _unchunk(x: Tensor, T: int) -> Tensor:
    """`[B, H, N, n, D] -> [B, T, H, D]` (the adjoint of `_vector_chunks`: padding dropped)."""
    B, H, N, n, D = x.shape
    return x.reshape(B, H, N * n, D)[:, :, :T].transpose(1, 2)


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
