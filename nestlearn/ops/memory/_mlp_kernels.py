"""The Triton kernels of the MLP memory's chunk recurrence, forward and backward (imported only when they are
launched, so that importing nestlearn does not import Triton).

What this is: `_mlp_forward_kernel`, one program per (sequence x head) walking the chunks in order with the whole
state `(W1 [D, E], W2 [E, D], S1, S2)` on chip, computing exactly `adjoint.mlp_chunk` (the residual MLP memory
`M(x) = x + W1 σ(W2 x)`, Eq. 89, behind the frozen surprise of Eq. 93, generated quantities from the chunk-start
state, D5): per chunk the self-generated targets (Eq. 84), the inner loss's dl/dy and dl/dz at the chunk start,
then `adjoint.matrix_step` for W2 (inputs the keys) and for W1 (inputs σ(W2 k), read by σ(W2's reads)), the DGD
system `T = I + diag(eta)(R_prev ∘ X̂X̂ᵀ)` inverted as `(I - L)(I + L²)(I + L⁴)...` (L strictly lower, so the
product of log2(n) factors is exact). It writes every chunk's outputs, every chunk-start state and the final
state. `_mlp_backward_kernel` walks the chunks back: it recomputes each chunk from its saved start and applies
`adjoint.mlp_chunk_adjoint` (the two matrix steps' adjoints, the MLP's chain, the frozen surprise), carrying the
state's adjoint in its scratch buffer (below); it writes the adjoints of every chunk's q, k, k̂, v and gate
products (which `adjoint._prepare_adjoint` takes back through the chunk layout) and of the initial
state. Its shared memory is kept down by a per-program scratch buffer in global memory (`NSLOT` slots and the
state's adjoint): every tensor a dot takes is stashed
there (or read from its input) and read back fresh just before its dots (section comment below), so that each
on-chip copy lives only around its own dots; without that the backward at 64-token chunks needed 640 KiB. The
adjoints it builds up (the state's, carried from chunk to chunk, and each matrix step's of its inputs) are
accumulated there too, term by term, instead of in registers (docs/decisions.md: 7 % off Titans' step). The
gate products (decay and momentum, `_Coef`) come in precomputed, so the decay and momentum switches are in the
data; DGD, self-generated values, the objective and the activation are compile-time switches.
What it is not: the branch LayerNorm, or a kernel for large states: the forward's state lives in
registers, so D and E are powers of two with D, n >= 16 and D * E <= 64 * 128, and chunks of at most 64 tokens
(over 32 only with D >= 32 and E >= 64: other shapes computed wrong results on the H200;
`adjoint.kernel_supports`; `benchmarks/kernel_resources.py` prints what each kernel needs of an sm_90 GPU).
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

ACTIVATIONS = {"silu": 0, "gelu": 1, "tanh": 2}
# Launch settings of both kernels. One stage: Triton's software pipelining of the chunk loop's loads would double
# the buffers of every chunk input in shared memory (the forward at 64-token chunks: 364 KiB with 3 stages, over
# Hopper's 227 KiB; 212 KiB with one; `benchmarks/kernel_resources.py`).
NUM_WARPS, NUM_STAGES = 8, 1


@triton.jit
def _sigma(z, ACT: tl.constexpr):
    if ACT == 0:
        return z * tl.sigmoid(z)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _dsigma(z, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        return 1.0 - t * t


@triton.jit
def _mm(a, b, P: tl.constexpr):
    return tl.dot(a, b, input_precision=P)


@triton.jit
def _load2(ptr, R: tl.constexpr, C: tl.constexpr):
    return tl.load(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])


@triton.jit
def _store2(ptr, x, R: tl.constexpr, C: tl.constexpr):
    tl.store(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], x)


@triton.jit
def _tri_inverse(L, n: tl.constexpr, LOGN: tl.constexpr, P: tl.constexpr):
    """`(I + L)⁻¹` for a strictly lower `L [n, n]` (n = 2^LOGN): `(I - L)(I + L²)(I + L⁴)...(I + L^(n/2))`."""
    a = tl.arange(0, n)
    eye = tl.where(a[:, None] == a[None, :], 1.0, 0.0)
    inv = eye - L
    power = L
    for _ in tl.static_range(1, LOGN):
        power = _mm(power, power, P)
        inv = _mm(inv, eye + power, P)
    return inv


@triton.jit
def _step_saved(W, S, X, Xh, Q, Err, eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp,
                n: tl.constexpr, LOGN: tl.constexpr, DGD: tl.constexpr, P: tl.constexpr):  # fmt: skip
    """One matrix step's reads and what its adjoint reuses (`adjoint._Step`; zeros without DGD)."""
    QX = _mm(Q, tl.trans(X), P)
    QXh = _mm(Q, tl.trans(Xh), P)
    O = gam[:, None] * _mm(Q, tl.trans(W), P) + m[:, None] * _mm(Q, tl.trans(S), P) + _mm(Dm * QX, Err, P)
    A = tl.zeros((n, n), tl.float32)
    XX = tl.zeros((n, n), tl.float32)
    Tinv = tl.zeros((n, n), tl.float32)
    Y = tl.zeros_like(Err)
    U = tl.zeros_like(Err)
    if DGD:
        A = _mm(Xh, tl.trans(Xh), P)
        XX = _mm(Xh, tl.trans(X), P)
        Y = gam_p[:, None] * _mm(Xh, tl.trans(W), P) + m_p[:, None] * _mm(Xh, tl.trans(S), P) + _mm(Dp * XX, Err, P)
        Tinv = _tri_inverse(eta[:, None] * (Rp * A), n, LOGN, P)
        U = _mm(Tinv, -eta[:, None] * Y, P)
        O += _mm(Rm * QXh, U, P)
    return O, QX, QXh, A, XX, Y, Tinv, U


@triton.jit
def _step_end(W, S, X, Xh, Err, U, gam_e, m_e, b_e, R_e, D_e, Lb_e, DGD: tl.constexpr, P: tl.constexpr):
    """One matrix step's chunk-end `W', S'` (`adjoint.matrix_step`), from `_step_saved`'s U."""
    Wn = gam_e * W + m_e * S + _mm(tl.trans(Err), D_e[:, None] * X, P)
    Sn = b_e * S + _mm(tl.trans(Err), Lb_e[:, None] * X, P)
    if DGD:
        Wn += _mm(tl.trans(U), R_e[:, None] * Xh, P)
    return Wn, Sn


@triton.jit
def _state_ptrs(P1, P2, P3, P4, i, D: tl.constexpr, E: tl.constexpr):
    """Where state i `(W1 [D, E], W2 [E, D], S1, S2)` starts in four buffers laid out `[..., D, E]` /
    `[..., E, D]`."""
    return P1 + i * D * E, P2 + i * E * D, P3 + i * D * E, P4 + i * E * D


@triton.jit
def _load_state(P1, P2, P3, P4, i, D: tl.constexpr, E: tl.constexpr):
    p1, p2, p3, p4 = _state_ptrs(P1, P2, P3, P4, i, D, E)
    return _load2(p1, D, E), _load2(p2, E, D), _load2(p3, D, E), _load2(p4, E, D)


@triton.jit
def _store_state(P1, P2, P3, P4, i, w1, w2, s1, s2, D: tl.constexpr, E: tl.constexpr):
    p1, p2, p3, p4 = _state_ptrs(P1, P2, P3, P4, i, D, E)
    _store2(p1, w1, D, E)
    _store2(p2, w2, E, D)
    _store2(p3, s1, D, E)
    _store2(p4, s2, E, D)


@triton.jit
def _chunk_ptrs(A, B, C, D, c, n: tl.constexpr, w: tl.constexpr):
    """Where chunk c starts in four buffers of `[n, w]` blocks (the inputs q, k, k̂, v: w = D; the gate
    matrices: w = n)."""
    return A + c * n * w, B + c * n * w, C + c * n * w, D + c * n * w


@triton.jit
def _load_inputs(Q, K, KH, V, c, n: tl.constexpr, D: tl.constexpr):
    """Chunk c's q, k, k̂, v `[n, D]`."""
    q, k, kh, v = _chunk_ptrs(Q, K, KH, V, c, n, D)
    return _load2(q, n, D), _load2(k, n, D), _load2(kh, n, D), _load2(v, n, D)


@triton.jit
def _load_coef(ETA, GAM, GAMP, MM, MMP, RM, RP, DM, DP, GAME, ME, BE, RE, DE, LBE, c, n: tl.constexpr):
    """Chunk c's gate products, in `_Coef`'s order."""
    an = tl.arange(0, n)
    rm, rp, dm, dp = _chunk_ptrs(RM, RP, DM, DP, c, n, n)
    return (tl.load(ETA + c * n + an), tl.load(GAM + c * n + an), tl.load(GAMP + c * n + an),
            tl.load(MM + c * n + an), tl.load(MMP + c * n + an), _load2(rm, n, n), _load2(rp, n, n),
            _load2(dm, n, n), _load2(dp, n, n), tl.load(GAME + c), tl.load(ME + c), tl.load(BE + c),
            tl.load(RE + c * n + an), tl.load(DE + c * n + an), tl.load(LBE + c * n + an))  # fmt: skip


@triton.jit
def _rowdot(a, b):
    return tl.sum(a * b, axis=1)


@triton.jit
def _clip_factor(r, h, back, k, clip):
    """The gradient clip's factor `c / max(c, ||G_t||)` per token, `||G_t||² = |r|² |h|² + |back|² |k|²` (the
    token's gradient is `(r hᵀ, back kᵀ)`; `common.clip_factor`)."""
    sq = _rowdot(r, r) * _rowdot(h, h) + _rowdot(back, back) * _rowdot(k, k)
    return clip * tl.rsqrt(tl.maximum(sq, clip * clip)), sq


@triton.jit
def _surprise(w1, w2, k, v, eta, clip, SELF_VALUES: tl.constexpr, L2: tl.constexpr, ACT: tl.constexpr,
              CLIP: tl.constexpr, P: tl.constexpr):  # fmt: skip
    """The inner loss's gradient at the chunk start (Eqs. 84, 93): -> z = k W2ᵀ, h = σ(z), r = dl/dy, r W1, the
    frozen errors e1 = -eta r `[n, D]` and e2 = -eta (r W1 ∘ σ'(z)) `[n, E]`, and back = r W1 ∘ σ'(z); with CLIP
    each token's -eta is scaled by the clip factor (`_clip_factor`; DGD's system keeps eta)."""
    if SELF_VALUES:  # noqa: SIM108 (compile-time branches read better in a kernel)
        vt = v + _mm(_sigma(_mm(v, tl.trans(w2), P), ACT), tl.trans(w1), P)
    else:
        vt = v
    z = _mm(k, tl.trans(w2), P)  # [n, E]
    h = _sigma(z, ACT)
    if L2:  # noqa: SIM108
        r = k + _mm(h, tl.trans(w1), P) - vt
    else:
        r = -vt
    rW1 = _mm(r, w1, P)
    back = rW1 * _dsigma(z, ACT)  # dl/dz [n, E]
    step = -eta
    if CLIP:
        cf, _ = _clip_factor(r, h, back, k, clip)
        step = step * cf
    return z, h, r, rW1, back, step[:, None] * r, step[:, None] * back


@triton.jit(do_not_specialize=["N"])  # one compile for every sequence length (`products` below)
def _mlp_forward_kernel(
    Q, K, KH, V,  # [BH, N, n, D]
    ETA, GAM, GAMP, MM, MMP,  # [BH, N, n]
    RM, RP, DM, DP,  # [BH, N, n, n]
    GAME, ME, BE,  # [BH, N]
    RE, DE, LBE,  # [BH, N, n]
    W1, W2, S1, S2,  # in: start state [BH, D, E], [BH, E, D]; out: final state (same buffers)
    STARTS1, STARTS2, STARTT1, STARTT2,  # [BH, N, D, E] / [BH, N, E, D]: every chunk's start state
    OUT,  # [BH, N, n, D]
    N, eps, clip,
    n: tl.constexpr, LOGN: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    DGD: tl.constexpr, SELF_VALUES: tl.constexpr, L2: tl.constexpr, ACT: tl.constexpr, CLIP: tl.constexpr,
    P: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    w1, w2, s1, s2 = _load_state(W1, W2, S1, S2, bh, D, E)
    for j in range(N):
        c = bh * N + j
        _store_state(STARTS1, STARTS2, STARTT1, STARTT2, c, w1, w2, s1, s2, D, E)
        q, k, kh, v = _load_inputs(Q, K, KH, V, c, n, D)
        eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, gam_e, m_e, b_e, R_e, D_e, Lb_e = _load_coef(
            ETA, GAM, GAMP, MM, MMP, RM, RP, DM, DP, GAME, ME, BE, RE, DE, LBE, c, n
        )
        _, h, _, _, _, e1, e2 = _surprise(w1, w2, k, v, eta, clip, SELF_VALUES, L2, ACT, CLIP, P)
        # W2 (inputs: the keys), then W1 (inputs: σ(W2 k), read by σ(W2's reads))
        zr, _, _, _, _, _, _, U2 = _step_saved(w2, s2, k, kh, q, e2, eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, n, LOGN,
                                               DGD, P)  # fmt: skip
        w2n, s2n = _step_end(w2, s2, k, kh, e2, U2, gam_e, m_e, b_e, R_e, D_e, Lb_e, DGD, P)
        hr = _sigma(zr, ACT)
        hh = h / tl.sqrt(tl.sum(h * h, axis=1) + eps * eps)[:, None]
        o1, _, _, _, _, _, _, U1 = _step_saved(w1, s1, h, hh, hr, e1, eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, n, LOGN,
                                               DGD, P)  # fmt: skip
        w1n, s1n = _step_end(w1, s1, h, hh, e1, U1, gam_e, m_e, b_e, R_e, D_e, Lb_e, DGD, P)
        _store2(OUT + c * n * D, q + o1, n, D)
        w1, w2, s1, s2 = w1n, w2n, s1n, s2n
    _store_state(W1, W2, S1, S2, bh, w1, w2, s1, s2, D, E)


# ---------------------------------------------------------------------------------------------
# backward: the chunks in reverse, each recomputed from its saved start (adjoint.py's equations)
#
# Shared memory: on Hopper every dot's B operand (and both operands of a dot with fewer than 64 rows) lives in
# shared memory, tf32x3 keeps two copies (high and low parts), and a tensor that feeds several dots far apart
# keeps its copies alive from the first to the last (the compiler merges its identical conversions). So each
# value a dot takes is stashed in a per-program scratch buffer when computed (or read from its input) and read
# back fresh (`_get`: a volatile load, which the compiler never merges with another) just before the dots that
# take it: every shared copy lives only around its own dots.


@triton.jit
def _d2sigma(z, ACT: tl.constexpr):
    """σ''(z)."""
    if ACT == 0:
        s = tl.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == 1:
        return tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
    else:
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        return -2.0 * t * (1.0 - t * t)


@triton.jit
def _get(ptr, R: tl.constexpr, C: tl.constexpr):
    """A fresh copy of `[R, C]` at ptr (after the block's earlier stores)."""
    tl.debug_barrier()
    return tl.load(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], volatile=True)


@triton.jit
def _getv(ptr, R: tl.constexpr):
    tl.debug_barrier()
    return tl.load(ptr + tl.arange(0, R), volatile=True)


@triton.jit
def _put(ptr, x, R: tl.constexpr, C: tl.constexpr):
    tl.debug_barrier()  # after the block's earlier reads of ptr
    _store2(ptr, x, R, C)


@triton.jit
def _step_stash(Wp, Sp, Xp, Xhp, Qp, Errp, SV, eta, gam, gam_p, m, m_p, RMp, RPp, DMp, DPp,
                n: tl.constexpr, LOGN: tl.constexpr, O_: tl.constexpr, I_: tl.constexpr, SLOT: tl.constexpr,
                DGD: tl.constexpr, READS: tl.constexpr, P: tl.constexpr):  # fmt: skip
    """One matrix step's reads O (returned; zeros unless READS: the backward needs W2's, which W1 takes, not W1's)
    and what its adjoint reuses, stashed at SV: QX, QXh, A, XX, Y, Tinv, U in slots 0..6, slot 7 for the
    adjoint's X̂ dW'ᵀ, then its dY (`adjoint._Step`; the DGD ones only with DGD). W, S `[O_, I_]`, X, X̂, Q
    `[n, I_]` and Err `[n, O_]` are read from their pointers."""
    Q = _get(Qp, n, I_)
    QX = _mm(Q, tl.trans(_get(Xp, n, I_)), P)
    _put(SV, QX, n, n)
    O = tl.zeros((n, O_), tl.float32)
    if READS:
        O += gam[:, None] * _mm(Q, tl.trans(_get(Wp, O_, I_)), P) + m[:, None] * _mm(
            Q, tl.trans(_get(Sp, O_, I_)), P)  # fmt: skip
        O += _mm(_get(DMp, n, n) * QX, _get(Errp, n, O_), P)
    if DGD:
        Xh = _get(Xhp, n, I_)
        QXh = _mm(_get(Qp, n, I_), tl.trans(Xh), P)
        _put(SV + SLOT, QXh, n, n)
        Xh = _get(Xhp, n, I_)
        A = _mm(Xh, tl.trans(Xh), P)
        _put(SV + 2 * SLOT, A, n, n)
        XX = _mm(_get(Xhp, n, I_), tl.trans(_get(Xp, n, I_)), P)
        _put(SV + 3 * SLOT, XX, n, n)
        Xh = _get(Xhp, n, I_)
        Y = gam_p[:, None] * _mm(Xh, tl.trans(_get(Wp, O_, I_)), P) + m_p[:, None] * _mm(
            Xh, tl.trans(_get(Sp, O_, I_)), P) + _mm(_get(DPp, n, n) * XX, _get(Errp, n, O_), P)  # fmt: skip
        _put(SV + 4 * SLOT, Y, n, O_)
        Tinv = _tri_inverse(eta[:, None] * (_get(RPp, n, n) * A), n, LOGN, P)
        _put(SV + 5 * SLOT, Tinv, n, n)
        U = _mm(Tinv, -eta[:, None] * Y, P)
        _put(SV + 6 * SLOT, U, n, O_)
        if READS:
            O += _mm(_get(RMp, n, n) * QXh, _get(SV + 6 * SLOT, n, O_), P)
    return O


@triton.jit
def _state_term_adjoint(Wp, Sp, Zp, a, b, dP, O_: tl.constexpr, I_: tl.constexpr, n: tl.constexpr,
                        P: tl.constexpr):  # fmt: skip
    """The adjoint of `a ⊙ Z Wᵀ + b ⊙ Z Sᵀ` (`adjoint._state_term_adjoint`): -> dW, dS, dZ, da, db."""
    dPW = _mm(dP, _get(Wp, O_, I_), P)
    dPS = _mm(dP, _get(Sp, O_, I_), P)
    dW = _mm(tl.trans(a[:, None] * dP), _get(Zp, n, I_), P)
    dS = _mm(tl.trans(b[:, None] * dP), _get(Zp, n, I_), P)
    Z = _get(Zp, n, I_)
    return dW, dS, a[:, None] * dPW + b[:, None] * dPS, _rowdot(dPW, Z), _rowdot(dPS, Z)


@triton.jit
def _masked_adjoint(mask, FG, H, dP, P: tl.constexpr):
    """The adjoint of `(mask ∘ FG) H` (`adjoint._masked_adjoint`): -> dH, dmask, dFG."""
    Nm = _mm(dP, tl.trans(H), P)
    return _mm(tl.trans(mask * FG), dP, P), Nm * FG, Nm * mask


@triton.jit
def _acc_store(ptr, x, R: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr):
    """Store x at ptr (ACC: add it to what the block stored there before, `old + x`)."""
    if ACC:
        x = _get(ptr, R, C) + x
    _put(ptr, x, R, C)


@triton.jit
def _step_adjoint(Wp, Sp, Xp, Xhp, Qp, Errp, SV, dOp, DWN, DSN, GW, GS, GX, GXH, GQ, GE,
                  eta, gam, gam_p, m, m_p, RMp, RPp, DMp, DPp, gam_e, m_e, b_e, R_e, D_e, Lb_e,
                  CRMp, CRPp, CDMp, CDPp, ACC: tl.constexpr,
                  n: tl.constexpr, O_: tl.constexpr, I_: tl.constexpr, SLOT: tl.constexpr, DGD: tl.constexpr,
                  P: tl.constexpr):  # fmt: skip
    """`adjoint.matrix_step_adjoint` from `_step_stash`'s stash SV, dO `[n, O_]` at dOp and the chunk-end state's
    adjoint dW', dS' `[O_, I_]` at DWN, DSN: the adjoints dW, dS, dX, dX̂, dQ, dE are stored at GW, GS, GX, GXH,
    GQ, GE (accumulated there term by term, so that none of them is held whole on chip across the dots), the gate
    products' vector adjoints (eta, gam, gam_prev, m, m_prev, gam_e, m_e, b_e, R_e, D_e, Lb_e) returned; the
    [n, n] ones (R, R_prev, D, D_prev) are stored at CRMp, CRPp, CDMp, CDPp (ACC: added to what is there). No
    output may alias an input: the outputs are written before the inputs' last reads."""
    # chunk-end momentum S' and weight W'
    S = _get(Sp, O_, I_)
    dSn = _get(DSN, O_, I_)
    dWn = _get(DWN, O_, I_)
    c_be = tl.sum(tl.sum(dSn * S, axis=1), axis=0)
    c_me = tl.sum(tl.sum(dWn * S, axis=1), axis=0)
    _put(GS, b_e * dSn + m_e * dWn, O_, I_)
    c_game = tl.sum(tl.sum(_get(DWN, O_, I_) * _get(Wp, O_, I_), axis=1), axis=0)
    _put(GW, gam_e * _get(DWN, O_, I_), O_, I_)
    EdS = _mm(_get(Errp, n, O_), _get(DSN, O_, I_), P)
    EdW = _mm(_get(Errp, n, O_), _get(DWN, O_, I_), P)
    X = _get(Xp, n, I_)
    c_Lbe = _rowdot(EdS, X)
    c_De = _rowdot(EdW, X)
    _put(GX, Lb_e[:, None] * EdS + D_e[:, None] * EdW, n, I_)
    X = _get(Xp, n, I_)
    _put(GE, Lb_e[:, None] * _mm(X, tl.trans(_get(DSN, O_, I_)), P) + D_e[:, None] * _mm(
        X, tl.trans(_get(DWN, O_, I_)), P), n, O_)  # fmt: skip
    c_Re = tl.zeros_like(eta)
    if DGD:  # the rest of the chunk-end terms; X̂ dW'ᵀ waits in slot 7 (dY's, later) for dU
        UdW = _mm(_get(SV + 6 * SLOT, n, O_), _get(DWN, O_, I_), P)
        Xh = _get(Xhp, n, I_)
        c_Re = _rowdot(UdW, Xh)
        _put(GXH, R_e[:, None] * UdW, n, I_)
        _put(SV + 7 * SLOT, _mm(_get(Xhp, n, I_), tl.trans(_get(DWN, O_, I_)), P), n, O_)
    else:
        _put(GXH, tl.zeros((n, I_), tl.float32), n, I_)
    # reads: O = Γ ⊙ Q Wᵀ + m ⊙ Q Sᵀ + (R ∘ Q X̂ᵀ) U + (D ∘ Q Xᵀ) E
    gW, gS, dQ, c_gam, c_m = _state_term_adjoint(Wp, Sp, Qp, gam, m, _get(dOp, n, O_), O_, I_, n, P)
    _acc_store(GW, gW, O_, I_, True)
    _acc_store(GS, gS, O_, I_, True)
    _put(GQ, dQ, n, I_)
    gE, c_D, G2 = _masked_adjoint(_get(DMp, n, n), _get(SV, n, n), _get(Errp, n, O_), _get(dOp, n, O_), P)
    _acc_store(CDMp, c_D, n, n, ACC)
    _acc_store(GE, gE, n, O_, True)
    _acc_store(GQ, _mm(G2, _get(Xp, n, I_), P), n, I_, True)
    _acc_store(GX, _mm(tl.trans(G2), _get(Qp, n, I_), P), n, I_, True)
    c_eta = tl.zeros_like(eta)
    c_gp = tl.zeros_like(eta)
    c_mp = tl.zeros_like(eta)
    if DGD:
        gU, c_R, G1 = _masked_adjoint(_get(RMp, n, n), _get(SV + SLOT, n, n), _get(SV + 6 * SLOT, n, O_),
                                      _get(dOp, n, O_), P)  # fmt: skip
        _acc_store(CRMp, c_R, n, n, ACC)
        dU = R_e[:, None] * _get(SV + 7 * SLOT, n, O_) + gU
        _acc_store(GXH, _mm(tl.trans(G1), _get(Qp, n, I_), P), n, I_, True)
        _acc_store(GQ, _mm(G1, _get(Xhp, n, I_), P), n, I_, True)
        # the DGD system: U = T⁻¹ rhs, rhs = -eta ⊙ Y, Y = Γp ⊙ X̂ Wᵀ + mp ⊙ X̂ Sᵀ + (Dp ∘ X̂ Xᵀ) E
        drhs = _mm(tl.trans(_get(SV + 5 * SLOT, n, n)), dU, P)
        a = tl.arange(0, n)
        dT = tl.where(a[:, None] > a[None, :], -_mm(drhs, tl.trans(_get(SV + 6 * SLOT, n, O_)), P), 0.0)
        A = _get(SV + 2 * SLOT, n, n)
        c_eta = -_rowdot(drhs, _get(SV + 4 * SLOT, n, O_)) + tl.sum(dT * _get(RPp, n, n) * A, axis=1)
        c_Rp = eta[:, None] * (dT * A)
        _acc_store(CRPp, c_Rp, n, n, ACC)
        dA = eta[:, None] * (dT * _get(RPp, n, n))
        _put(SV + 7 * SLOT, -eta[:, None] * drhs, n, O_)  # dY, fresh for each of its two uses
        gW, gS, gXh, c_gp, c_mp = _state_term_adjoint(Wp, Sp, Xhp, gam_p, m_p, _get(SV + 7 * SLOT, n, O_), O_, I_,
                                                      n, P)  # fmt: skip
        _acc_store(GW, gW, O_, I_, True)
        _acc_store(GS, gS, O_, I_, True)
        _acc_store(GXH, gXh, n, I_, True)
        gE, c_Dp, dXX = _masked_adjoint(_get(DPp, n, n), _get(SV + 3 * SLOT, n, n), _get(Errp, n, O_),
                                        _get(SV + 7 * SLOT, n, O_), P)  # fmt: skip
        _acc_store(CDPp, c_Dp, n, n, ACC)
        _acc_store(GE, gE, n, O_, True)
        _acc_store(GXH, _mm(dXX, _get(Xp, n, I_), P), n, I_, True)
        _acc_store(GX, _mm(tl.trans(dXX), _get(Xhp, n, I_), P), n, I_, True)
        # T = I + diag(eta)(Rp ∘ X̂ X̂ᵀ)
        _acc_store(GXH, _mm(dA + tl.trans(dA), _get(Xhp, n, I_), P), n, I_, True)
    elif not ACC:  # without DGD those three adjoints are zeros: the first step writes them, the second has nothing
        _put(CRMp, tl.zeros((n, n), tl.float32), n, n)
        _put(CRPp, tl.zeros((n, n), tl.float32), n, n)
        _put(CDPp, tl.zeros((n, n), tl.float32), n, n)
    return (c_eta, c_gam, c_gp, c_m, c_mp, c_game, c_me, c_be, c_Re, c_De, c_Lbe)


# scratch of `_mlp_backward_kernel`, per program: NSLOT slots of n max(n, E) floats (the two steps' stashes, then
# the surprise's tensors, the W1 step's inputs, the W1 step's adjoints of its inputs and errors, all read by the
# surprise's adjoint, and the W2 step's adjoint of its errors), then two sets of the state's adjoint, each four
# [D, E] blocks (dW1, dW2, dS1, dS2: the chunk end's, read, and the chunk start's, built up; they swap every chunk)
NSLOT = 31


@triton.jit
def _adjoint_set(ST, s, D: tl.constexpr, E: tl.constexpr):
    """Set s (0 or 1) of the state's adjoint in the scratch's state region ST: dW1, dW2, dS1, dS2 pointers."""
    base = ST + s * 4 * D * E
    return base, base + D * E, base + 2 * D * E, base + 3 * D * E


@triton.jit(do_not_specialize=["N"])
def _mlp_backward_kernel(
    Q, K, KH, V,  # [BH, N, n, D]
    ETA, GAM, GAMP, MM, MMP, RM, RP, DM, DP, GAME, ME, BE, RE, DE, LBE,  # the forward's `_Coef` fields
    STARTS1, STARTS2, STARTT1, STARTT2,  # every chunk's start state
    DOUT,  # [BH, N, n, D]
    DW1, DW2, DS1, DS2,  # in: the final state's adjoint; out: the initial state's
    DA1, DA2,  # the anchor's adjoint (added to the last chunk's start when the call ends inside it)
    DQ, DK, DKH, DV,  # out: [BH, N, n, D]
    CETA, CGAM, CGAMP, CMM, CMMP, CRM, CRP, CDM, CDP, CGAME, CME, CBE, CRE, CDE, CLBE,  # out: gate adjoints
    SCRATCH,  # [BH, NSLOT * SLOT + 8 * D * E]
    N, eps, clip,
    n: tl.constexpr, LOGN: tl.constexpr, D: tl.constexpr, E: tl.constexpr, DGD: tl.constexpr,
    SELF_VALUES: tl.constexpr, L2: tl.constexpr, ACT: tl.constexpr, CLIP: tl.constexpr, ANCHOR: tl.constexpr,
    P: tl.constexpr, SLOT: tl.constexpr, NS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    an = tl.arange(0, n)
    SC = SCRATCH + bh * (NS * SLOT + 8 * D * E)
    ST = SC + NS * SLOT  # the state's adjoint: two sets (`_adjoint_set`)
    SV1 = SC + 0 * SLOT  # the W1 step's stash (8 slots)
    SV2 = SC + 8 * SLOT  # the W2 step's stash (8 slots)
    SZ = SC + 16 * SLOT
    SH = SC + 17 * SLOT
    SR = SC + 18 * SLOT
    SRW1 = SC + 19 * SLOT
    SBACK = SC + 20 * SLOT
    SE1 = SC + 21 * SLOT
    SE2 = SC + 22 * SLOT
    SHH = SC + 23 * SLOT
    SHR = SC + 24 * SLOT
    SZR = SC + 25 * SLOT
    SDH = SC + 26 * SLOT
    SDHH = SC + 27 * SLOT
    SDHR = SC + 28 * SLOT
    SDE1 = SC + 29 * SLOT
    SDE2 = SC + 30 * SLOT
    d1, d2, ds1, ds2 = _load_state(DW1, DW2, DS1, DS2, bh, D, E)
    I1, I2, IS1, IS2 = _adjoint_set(ST, 0, D, E)
    _store_state(I1, I2, IS1, IS2, 0, d1, d2, ds1, ds2, D, E)
    for jj in range(N):
        j = N - 1 - jj
        I1, I2, IS1, IS2 = _adjoint_set(ST, jj % 2, D, E)  # the chunk end's state adjoint
        O1, O2, OS1, OS2 = _adjoint_set(ST, 1 - jj % 2, D, E)  # the chunk start's, built up below
        c = bh * N + j
        W1p, W2p, S1p, S2p = _state_ptrs(STARTS1, STARTS2, STARTT1, STARTT2, c, D, E)
        Qp, Kp, KHp, Vp = _chunk_ptrs(Q, K, KH, V, c, n, D)
        RMp, RPp, DMp, DPp = _chunk_ptrs(RM, RP, DM, DP, c, n, n)
        CRMp, CRPp, CDMp, CDPp = _chunk_ptrs(CRM, CRP, CDM, CDP, c, n, n)  # where both steps' [n, n] adjoints add
        DOp = DOUT + c * n * D
        eta = _getv(ETA + c * n, n)
        gam = _getv(GAM + c * n, n)
        gam_p = _getv(GAMP + c * n, n)
        m = _getv(MM + c * n, n)
        m_p = _getv(MMP + c * n, n)
        gam_e = tl.load(GAME + c)
        m_e = tl.load(ME + c)
        b_e = tl.load(BE + c)
        R_e = _getv(RE + c * n, n)
        D_e = _getv(DE + c * n, n)
        Lb_e = _getv(LBE + c * n, n)
        # the chunk again, from its start (adjoint.mlp_chunk with ends=False): the surprise (`_surprise`)
        v = _get(Vp, n, D)
        if SELF_VALUES:
            vt = v + _mm(_sigma(_mm(v, tl.trans(_get(W2p, E, D)), P), ACT), tl.trans(_get(W1p, D, E)), P)
        else:
            vt = v
        z = _mm(_get(Kp, n, D), tl.trans(_get(W2p, E, D)), P)  # [n, E]
        _put(SZ, z, n, E)
        h = _sigma(z, ACT)
        _put(SH, h, n, E)
        if L2:  # noqa: SIM108
            r = _get(Kp, n, D) + _mm(_get(SH, n, E), tl.trans(_get(W1p, D, E)), P) - vt
        else:
            r = -vt
        _put(SR, r, n, D)
        rW1 = _mm(_get(SR, n, D), _get(W1p, D, E), P)
        _put(SRW1, rW1, n, E)
        back = rW1 * _dsigma(z, ACT)  # dl/dz [n, E]
        _put(SBACK, back, n, E)
        step = -eta
        if CLIP:
            cf, _ = _clip_factor(_get(SR, n, D), _get(SH, n, E), back, _get(Kp, n, D), clip)
            step = step * cf
        _put(SE1, step[:, None] * _get(SR, n, D), n, D)
        _put(SE2, step[:, None] * back, n, E)
        # the W2 step (inputs the keys): its reads, its stash for the adjoint below
        zr = _step_stash(W2p, S2p, Kp, KHp, Qp, SE2, SV2, eta, gam, gam_p, m, m_p, RMp, RPp, DMp, DPp, n, LOGN, E,
                         D, SLOT, DGD, True, P)  # fmt: skip
        _put(SZR, zr, n, E)
        _put(SHR, _sigma(zr, ACT), n, E)
        h = _get(SH, n, E)
        nrm = tl.sqrt(tl.sum(h * h, axis=1) + eps * eps)
        _put(SHH, h / nrm[:, None], n, E)
        _ = _step_stash(W1p, S1p, SH, SHH, SHR, SE1, SV1, eta, gam, gam_p, m, m_p, RMp, RPp, DMp, DPp, n, LOGN, D,
                        E, SLOT, DGD, False, P)  # fmt: skip
        # W1 reads σ(W2's reads): its adjoint first, then W2's with the chained read adjoint; W2's adjoints of its
        # inputs go straight to the chunk's dk, dk̂, dq
        dqp, dkp, dkhp, dvp = _chunk_ptrs(DQ, DK, DKH, DV, c, n, D)
        (c_eta, c_gam, c_gp, c_m, c_mp, c_game, c_me, c_be, c_Re, c_De, c_Lbe) = _step_adjoint(
            W1p, S1p, SH, SHH, SHR, SE1, SV1, DOp, I1, IS1, O1, OS1, SDH, SDHH, SDHR, SDE1,
            eta, gam, gam_p, m, m_p, RMp, RPp, DMp, DPp, gam_e, m_e, b_e, R_e, D_e, Lb_e, CRMp, CRPp, CDMp, CDPp,
            False, n, D, E, SLOT, DGD, P)  # fmt: skip
        if DGD:  # through h_hat = h / |h|
            hh = _get(SHH, n, E)
            dHh = _get(SDHH, n, E)
            _acc_store(SDH, (dHh - _rowdot(dHh, hh)[:, None] * hh) / nrm[:, None], n, E, True)
        _put(SZR, _get(SDHR, n, E) * _dsigma(_get(SZR, n, E), ACT), n, E)  # zr's slot now holds dzr
        (c_eta2, c_gam2, c_gp2, c_m2, c_mp2, c_game2, c_me2, c_be2, c_Re2, c_De2, c_Lbe2) = _step_adjoint(
            W2p, S2p, Kp, KHp, Qp, SE2, SV2, SZR, I2, IS2, O2, OS2, dkp, dkhp,
            dqp, SDE2, eta, gam, gam_p, m, m_p, RMp, RPp, DMp, DPp, gam_e, m_e, b_e, R_e, D_e, Lb_e, CRMp, CRPp,
            CDMp, CDPp, True, n, E, D, SLOT, DGD, P)  # fmt: skip
        _acc_store(dqp, _get(DOp, n, D), n, D, True)  # the residual of Eq. 89
        # the frozen surprise: e1 = -eta cf r, e2 = -eta cf (r W1 ∘ σ'(z)), r = k + σ(z) W1ᵀ - v_t (L2) or -v_t
        # (dot), cf the clip factor (1 without CLIP)
        d_step = _rowdot(_get(SDE1, n, D), _get(SR, n, D)) + _rowdot(_get(SDE2, n, E), _get(SBACK, n, E))
        cf = tl.full((n,), 1.0, tl.float32)
        dK = tl.zeros((n, D), tl.float32)  # added to the W2 step's at the end
        if CLIP:  # cf = c / sqrt(max(sq, c²)): its adjoint through sq = |r|² |h|² + |back|² |k|²
            cf, sq = _clip_factor(_get(SR, n, D), _get(SH, n, E), _get(SBACK, n, E), _get(Kp, n, D), clip)
            dsq = tl.where(sq > clip * clip, 0.5 * eta * d_step * cf / tl.maximum(sq, clip * clip), 0.0)
            _acc_store(SDH, (2.0 * dsq * _rowdot(_get(SR, n, D), _get(SR, n, D)))[:, None] * _get(SH, n, E), n, E,
                       True)  # fmt: skip
            dK += (2.0 * dsq * _rowdot(_get(SBACK, n, E), _get(SBACK, n, E)))[:, None] * _get(Kp, n, D)
            dback = (2.0 * dsq * _rowdot(_get(Kp, n, D), _get(Kp, n, D)))[:, None] * _get(SBACK, n, E)
            dr = (2.0 * dsq * _rowdot(_get(SH, n, E), _get(SH, n, E)))[:, None] * _get(SR, n, D)
        else:
            dback = tl.zeros((n, E), tl.float32)
            dr = tl.zeros((n, D), tl.float32)
        c_eta += c_eta2 - cf * d_step
        dback += -(eta * cf)[:, None] * _get(SDE2, n, E)
        z = _get(SZ, n, E)
        drW1 = dback * _dsigma(z, ACT)
        dz = dback * _get(SRW1, n, E) * _d2sigma(z, ACT)
        dr += -(eta * cf)[:, None] * _get(SDE1, n, D) + _mm(drW1, tl.trans(_get(W1p, D, E)), P)
        _acc_store(O1, _mm(tl.trans(_get(SR, n, D)), drW1, P), D, E, True)
        if L2:
            dK += dr
            _acc_store(SDH, _mm(dr, _get(W1p, D, E), P), n, E, True)
            _acc_store(O1, _mm(tl.trans(dr), _get(SH, n, E), P), D, E, True)
        dz += _get(SDH, n, E) * _dsigma(_get(SZ, n, E), ACT)
        dK += _mm(dz, _get(W2p, E, D), P)
        _acc_store(O2, _mm(tl.trans(dz), _get(Kp, n, D), P), E, D, True)
        dv = -dr
        if SELF_VALUES:  # v_t = v + W1 σ(W2 v) at the chunk start
            zv = _mm(_get(Vp, n, D), tl.trans(_get(W2p, E, D)), P)
            _acc_store(O1, -_mm(tl.trans(dr), _sigma(zv, ACT), P), D, E, True)
            dzv = -_mm(dr, _get(W1p, D, E), P) * _dsigma(zv, ACT)
            _acc_store(O2, _mm(tl.trans(dzv), _get(Vp, n, D), P), E, D, True)
            dv += _mm(dzv, _get(W2p, E, D), P)
        if ANCHOR:  # noqa: SIM102 (compile-time switch around a run-time test): the last (open) chunk's start
            if j == N - 1:
                _acc_store(O1, _load2(DA1 + bh * D * E, D, E), D, E, True)
                _acc_store(O2, _load2(DA2 + bh * E * D, E, D), E, D, True)
        _acc_store(dkp, dK, n, D, True)
        _store2(dvp, dv, n, D)
        tl.store(CETA + c * n + an, c_eta)
        tl.store(CGAM + c * n + an, c_gam + c_gam2)
        tl.store(CGAMP + c * n + an, c_gp + c_gp2)
        tl.store(CMM + c * n + an, c_m + c_m2)
        tl.store(CMMP + c * n + an, c_mp + c_mp2)
        tl.store(CGAME + c, c_game + c_game2)
        tl.store(CME + c, c_me + c_me2)
        tl.store(CBE + c, c_be + c_be2)
        tl.store(CRE + c * n + an, c_Re + c_Re2)
        tl.store(CDE + c * n + an, c_De + c_De2)
        tl.store(CLBE + c * n + an, c_Lbe + c_Lbe2)
    F1, F2, FS1, FS2 = _adjoint_set(ST, N % 2, D, E)  # the first chunk's start: the initial state's adjoint
    d1 = _get(F1, D, E)
    d2 = _get(F2, E, D)
    ds1 = _get(FS1, D, E)
    ds2 = _get(FS2, E, D)
    _store_state(DW1, DW2, DS1, DS2, bh, d1, d2, ds1, ds2, D, E)


# The GPU dots' precision, set in the environment: "auto" (default: "tf32" for a call under bf16 or float16
# autocast, where the model's own products keep 8 or 11 significant bits, "tf32x3" otherwise), "tf32x3" (float32
# accuracy from three tensor-core passes per product), "tf32" (one pass, a third of the work; emulated on CPU it
# moves the chunk form's states by ~1.5e-4 and its gradients by ~5e-4 relative to float64 over 4K tokens, against
# float32's 2e-6 and bf16 products' 1.2e-3 / 3.4e-3: docs/decisions.md) or "ieee" (FMA, slowest).
PRECISION_ENV = "NESTLEARN_KERNEL_PRECISION"
GPU_PRECISIONS = ("auto", "tf32x3", "tf32", "ieee")


def products(device: torch.device, mixed: bool = False) -> str:
    """The dots' precision on `device` for a call under bf16 / float16 autocast (`mixed`) or not:
    `NESTLEARN_KERNEL_PRECISION` ("auto" when unset: tf32 under autocast, tf32x3 otherwise), exact float32 in the
    interpreter. A compiled kernel is cached per precision (so a process that trains under autocast and evaluates
    in float32 compiles both), switch combination, chunk length and head shape, not per sequence length (`N` is
    not specialized): a tf32x3 backward at 32 or 64 tokens takes 5 to 11 minutes to compile on a 2-core CPU, a
    tf32 one about 3 (docs/results/kernel_resources_sm90.md), once per machine and variant."""
    if device.type == "cpu":
        return "ieee"
    chosen = os.environ.get(PRECISION_ENV, "auto")
    if chosen not in GPU_PRECISIONS:
        raise ValueError(
            f"{PRECISION_ENV}={chosen!r} is not a kernel precision; use one of {', '.join(GPU_PRECISIONS)}"
        )
    if chosen == "auto":
        return "tf32" if mixed else "tf32x3"
    return chosen


def launch_mlp_forward(
    x: list[Tensor], coef: list[Tensor], state: list[Tensor], starts: list[Tensor], out: Tensor, *,
    eps: float, dgd: bool, self_values: bool, l2: bool, act: str, clip: float | None, mixed: bool = False,
) -> None:  # fmt: skip
    """Run `_mlp_forward_kernel`: `x = (q, k, k̂, v)` `[B, H, N, n, D]`, `coef` the 15 `_Coef` fields, `state =
    (W1, W2, S1, S2)` contiguous float32 (overwritten with the final state), `starts` the four `[B, H, N, ...]`
    start-state buffers, `out [B, H, N, n, D]`; `clip` the gradient clip's norm (None: no clip); `mixed`: the call
    runs under bf16 / float16 autocast (`products`)."""
    B, H, N, n, D = x[0].shape
    E = state[0].shape[-1]
    precision = products(out.device, mixed)
    _mlp_forward_kernel[(B * H,)](
        *x, *coef, *state, *starts, out, N, eps, 1.0 if clip is None else clip, n=n, LOGN=n.bit_length() - 1,
        D=D, E=E, DGD=dgd, SELF_VALUES=self_values, L2=l2, ACT=ACTIVATIONS[act], CLIP=clip is not None,
        P=precision, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip


def launch_mlp_backward(
    x: list[Tensor], coef: list[Tensor], starts: list[Tensor], dout: Tensor, d_state: list[Tensor],
    d_anchor: list[Tensor] | None, dx: list[Tensor], dcoef: list[Tensor], *,
    eps: float, dgd: bool, self_values: bool, l2: bool, act: str, clip: float | None, mixed: bool = False,
) -> None:  # fmt: skip
    """Run `_mlp_backward_kernel`: `x`, `coef`, `starts` as the forward's; `dout [B, H, N, n, D]`; `d_state` the
    final state's adjoint (contiguous float32, overwritten with the initial state's); `d_anchor` the anchor's
    adjoint (W1, W2) when the call ends inside its last chunk, else None; `dx = (dq, dk, dk̂, dv)` and `dcoef` (the
    15 `_Coef` fields' shapes) are filled. Allocates the kernel's scratch: `B H (NSLOT n max(n, E) + 8 D E)` floats
    (at B = 4, H = 8, n = 64, D = 32, E = 128: 35 MiB)."""
    B, H, N, n, D = x[0].shape
    E = d_state[0].shape[-1]
    precision = products(dout.device, mixed)
    anchor = d_anchor if d_anchor is not None else d_state[:2]
    slot = n * max(n, E)  # a dot operand, [n, n] or [n, E]
    scratch = dout.new_empty(B * H * (NSLOT * slot + 8 * D * E))  # and two sets of the state's adjoint
    _mlp_backward_kernel[(B * H,)](
        *x, *coef, *starts, dout, *d_state, *anchor, *dx, *dcoef, scratch, N, eps, 1.0 if clip is None else clip,
        n=n, LOGN=n.bit_length() - 1, D=D, E=E, DGD=dgd, SELF_VALUES=self_values, L2=l2, ACT=ACTIVATIONS[act],
        CLIP=clip is not None, ANCHOR=d_anchor is not None, P=precision, SLOT=slot, NS=NSLOT, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )  # fmt: skip
