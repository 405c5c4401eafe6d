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
state's adjoint on chip; it writes the adjoints of every chunk's q, k, k̂, v and gate products (which autograd
then takes back through the chunk layout, as `adjoint.py` does) and of the initial state. The gate products
(decay and momentum, `_Coef`) come in precomputed, so the decay and momentum switches are in the data; DGD,
self-generated values, the objective and the activation are compile-time switches.
What it is not: the clip or the branch LayerNorm, or a kernel for large states: the state lives in registers,
so D and E are powers of two with D, n >= 16 and D * E <= 64 * 128 (`adjoint.kernel_supports`).
"""

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
def _load_state(P1, P2, P3, P4, i, D: tl.constexpr, E: tl.constexpr):
    """State i `(W1 [D, E], W2 [E, D], S1, S2)` of four buffers laid out `[..., D, E]` / `[..., E, D]`."""
    return (_load2(P1 + i * D * E, D, E), _load2(P2 + i * E * D, E, D), _load2(P3 + i * D * E, D, E),
            _load2(P4 + i * E * D, E, D))  # fmt: skip


@triton.jit
def _store_state(P1, P2, P3, P4, i, w1, w2, s1, s2, D: tl.constexpr, E: tl.constexpr):
    _store2(P1 + i * D * E, w1, D, E)
    _store2(P2 + i * E * D, w2, E, D)
    _store2(P3 + i * D * E, s1, D, E)
    _store2(P4 + i * E * D, s2, E, D)


@triton.jit
def _load_inputs(Q, K, KH, V, c, n: tl.constexpr, D: tl.constexpr):
    """Chunk c's q, k, k̂, v `[n, D]`."""
    return (_load2(Q + c * n * D, n, D), _load2(K + c * n * D, n, D), _load2(KH + c * n * D, n, D),
            _load2(V + c * n * D, n, D))  # fmt: skip


@triton.jit
def _load_coef(ETA, GAM, GAMP, MM, MMP, RM, RP, DM, DP, GAME, ME, BE, RE, DE, LBE, c, n: tl.constexpr):
    """Chunk c's gate products, in `_Coef`'s order."""
    an = tl.arange(0, n)
    return (tl.load(ETA + c * n + an), tl.load(GAM + c * n + an), tl.load(GAMP + c * n + an),
            tl.load(MM + c * n + an), tl.load(MMP + c * n + an), _load2(RM + c * n * n, n, n),
            _load2(RP + c * n * n, n, n), _load2(DM + c * n * n, n, n), _load2(DP + c * n * n, n, n),
            tl.load(GAME + c), tl.load(ME + c), tl.load(BE + c), tl.load(RE + c * n + an), tl.load(DE + c * n + an),
            tl.load(LBE + c * n + an))  # fmt: skip


@triton.jit
def _surprise(w1, w2, k, v, eta, SELF_VALUES: tl.constexpr, L2: tl.constexpr, ACT: tl.constexpr, P: tl.constexpr):
    """The inner loss's gradient at the chunk start (Eqs. 84, 93): -> z = k W2ᵀ, h = σ(z), r = dl/dy, r W1, the
    frozen errors e1 = -eta r `[n, D]` and e2 = -eta (r W1 ∘ σ'(z)) `[n, E]`, and back = r W1 ∘ σ'(z)."""
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
    return z, h, r, rW1, back, -eta[:, None] * r, -eta[:, None] * back


@triton.jit
def _mlp_forward_kernel(
    Q, K, KH, V,  # [BH, N, n, D]
    ETA, GAM, GAMP, MM, MMP,  # [BH, N, n]
    RM, RP, DM, DP,  # [BH, N, n, n]
    GAME, ME, BE,  # [BH, N]
    RE, DE, LBE,  # [BH, N, n]
    W1, W2, S1, S2,  # in: start state [BH, D, E], [BH, E, D]; out: final state (same buffers)
    STARTS1, STARTS2, STARTT1, STARTT2,  # [BH, N, D, E] / [BH, N, E, D]: every chunk's start state
    OUT,  # [BH, N, n, D]
    N, eps,
    n: tl.constexpr, LOGN: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    DGD: tl.constexpr, SELF_VALUES: tl.constexpr, L2: tl.constexpr, ACT: tl.constexpr, P: tl.constexpr,
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
        _, h, _, _, _, e1, e2 = _surprise(w1, w2, k, v, eta, SELF_VALUES, L2, ACT, P)
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


@triton.jit
def _rowdot(a, b):
    return tl.sum(a * b, axis=1)


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
def _state_term_adjoint(W, S, Z, a, b, dP, P: tl.constexpr):
    """The adjoint of `a ⊙ Z Wᵀ + b ⊙ Z Sᵀ` (`adjoint._state_term_adjoint`): -> dW, dS, dZ, da, db."""
    dPW = _mm(dP, W, P)
    dPS = _mm(dP, S, P)
    dW = _mm(tl.trans(a[:, None] * dP), Z, P)
    dS = _mm(tl.trans(b[:, None] * dP), Z, P)
    return dW, dS, a[:, None] * dPW + b[:, None] * dPS, _rowdot(dPW, Z), _rowdot(dPS, Z)


@triton.jit
def _masked_adjoint(mask, FG, H, dP, P: tl.constexpr):
    """The adjoint of `(mask ∘ FG) H` (`adjoint._masked_adjoint`): -> dH, dmask, dFG."""
    Nm = _mm(dP, tl.trans(H), P)
    return _mm(tl.trans(mask * FG), dP, P), Nm * FG, Nm * mask


@triton.jit
def _step_adjoint(W, S, X, Xh, Q, Err, QX, QXh, A, XX, Y, Tinv, U, dO, dWn, dSn,
                  eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, gam_e, m_e, b_e, R_e, D_e, Lb_e,
                  n: tl.constexpr, DGD: tl.constexpr, P: tl.constexpr):  # fmt: skip
    """`adjoint.matrix_step_adjoint`: -> dW, dS, dX, dX̂, dQ, dE and the gate products' adjoints (eta, gam,
    gam_prev, m, m_prev, R, R_prev, D, D_prev, gam_e, m_e, b_e, R_e, D_e, Lb_e)."""
    # chunk-end momentum S' and weight W'
    dS = b_e * dSn + m_e * dWn
    dW = gam_e * dWn
    c_be = tl.sum(tl.sum(dSn * S, axis=1), axis=0)
    c_game = tl.sum(tl.sum(dWn * W, axis=1), axis=0)
    c_me = tl.sum(tl.sum(dWn * S, axis=1), axis=0)
    EdS = _mm(Err, dSn, P)
    EdW = _mm(Err, dWn, P)
    dE = Lb_e[:, None] * _mm(X, tl.trans(dSn), P) + D_e[:, None] * _mm(X, tl.trans(dWn), P)
    dX = Lb_e[:, None] * EdS + D_e[:, None] * EdW
    c_Lbe = _rowdot(EdS, X)
    c_De = _rowdot(EdW, X)
    # reads: O = Γ ⊙ Q Wᵀ + m ⊙ Q Sᵀ + (R ∘ Q X̂ᵀ) U + (D ∘ Q Xᵀ) E
    gW, gS, dQ, c_gam, c_m = _state_term_adjoint(W, S, Q, gam, m, dO, P)
    dW += gW
    dS += gS
    gE, c_D, G2 = _masked_adjoint(Dm, QX, Err, dO, P)
    dE += gE
    dQ += _mm(G2, X, P)
    dX += _mm(tl.trans(G2), Q, P)
    dXh = tl.zeros_like(Xh)
    c_eta = tl.zeros_like(eta)
    c_gp = tl.zeros_like(eta)
    c_mp = tl.zeros_like(eta)
    c_Re = tl.zeros_like(eta)
    c_R = tl.zeros((n, n), tl.float32)
    c_Rp = tl.zeros((n, n), tl.float32)
    c_Dp = tl.zeros((n, n), tl.float32)
    if DGD:
        UdW = _mm(U, dWn, P)
        gU, c_R, G1 = _masked_adjoint(Rm, QXh, U, dO, P)
        dU = R_e[:, None] * _mm(Xh, tl.trans(dWn), P) + gU
        dXh = R_e[:, None] * UdW + _mm(tl.trans(G1), Q, P)
        c_Re = _rowdot(UdW, Xh)
        dQ += _mm(G1, Xh, P)
        # the DGD system: U = T⁻¹ rhs, rhs = -eta ⊙ Y, Y = Γp ⊙ X̂ Wᵀ + mp ⊙ X̂ Sᵀ + (Dp ∘ X̂ Xᵀ) E
        drhs = _mm(tl.trans(Tinv), dU, P)
        a = tl.arange(0, n)
        dT = tl.where(a[:, None] > a[None, :], -_mm(drhs, tl.trans(U), P), 0.0)
        c_eta = -_rowdot(drhs, Y) + tl.sum(dT * Rp * A, axis=1)
        dY = -eta[:, None] * drhs
        gW, gS, gXh, c_gp, c_mp = _state_term_adjoint(W, S, Xh, gam_p, m_p, dY, P)
        dW += gW
        dS += gS
        dXh += gXh
        gE, c_Dp, dXX = _masked_adjoint(Dp, XX, Err, dY, P)
        dE += gE
        dXh += _mm(dXX, X, P)
        dX += _mm(tl.trans(dXX), Xh, P)
        # T = I + diag(eta)(Rp ∘ X̂ X̂ᵀ)
        c_Rp = eta[:, None] * (dT * A)
        dA = eta[:, None] * (dT * Rp)
        dXh += _mm(dA + tl.trans(dA), Xh, P)
    return (dW, dS, dX, dXh, dQ, dE, c_eta, c_gam, c_gp, c_m, c_mp, c_R, c_Rp, c_D, c_Dp, c_game, c_me, c_be, c_Re,
            c_De, c_Lbe)  # fmt: skip


@triton.jit
def _mlp_backward_kernel(
    Q, K, KH, V,  # [BH, N, n, D]
    ETA, GAM, GAMP, MM, MMP, RM, RP, DM, DP, GAME, ME, BE, RE, DE, LBE,  # the forward's `_Coef` fields
    STARTS1, STARTS2, STARTT1, STARTT2,  # every chunk's start state
    DOUT,  # [BH, N, n, D]
    DW1, DW2, DS1, DS2,  # in: the final state's adjoint; out: the initial state's
    DA1, DA2,  # the anchor's adjoint (added to the last chunk's start when the call ends inside it)
    DQ, DK, DKH, DV,  # out: [BH, N, n, D]
    CETA, CGAM, CGAMP, CMM, CMMP, CRM, CRP, CDM, CDP, CGAME, CME, CBE, CRE, CDE, CLBE,  # out: gate adjoints
    N, eps,
    n: tl.constexpr, LOGN: tl.constexpr, D: tl.constexpr, E: tl.constexpr, DGD: tl.constexpr,
    SELF_VALUES: tl.constexpr, L2: tl.constexpr, ACT: tl.constexpr, ANCHOR: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    an = tl.arange(0, n)
    d1, d2, ds1, ds2 = _load_state(DW1, DW2, DS1, DS2, bh, D, E)
    for jj in range(N):
        j = N - 1 - jj
        c = bh * N + j
        w1, w2, s1, s2 = _load_state(STARTS1, STARTS2, STARTT1, STARTT2, c, D, E)
        q, k, kh, v = _load_inputs(Q, K, KH, V, c, n, D)
        do = _load2(DOUT + c * n * D, n, D)
        eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, gam_e, m_e, b_e, R_e, D_e, Lb_e = _load_coef(
            ETA, GAM, GAMP, MM, MMP, RM, RP, DM, DP, GAME, ME, BE, RE, DE, LBE, c, n
        )
        # the chunk again, from its start (adjoint.mlp_chunk with ends=False)
        z, h, r, rW1, back, e1, e2 = _surprise(w1, w2, k, v, eta, SELF_VALUES, L2, ACT, P)
        zr, QX2, QXh2, A2, XX2, Y2, T2, U2 = _step_saved(w2, s2, k, kh, q, e2, eta, gam, gam_p, m, m_p, Rm, Rp, Dm,
                                                         Dp, n, LOGN, DGD, P)  # fmt: skip
        hr = _sigma(zr, ACT)
        nrm = tl.sqrt(tl.sum(h * h, axis=1) + eps * eps)
        hh = h / nrm[:, None]
        _, QX1, QXh1, A1, XX1, Y1, T1, U1 = _step_saved(w1, s1, h, hh, hr, e1, eta, gam, gam_p, m, m_p, Rm, Rp, Dm,
                                                        Dp, n, LOGN, DGD, P)  # fmt: skip
        # W1 reads σ(W2's reads): its adjoint first, then W2's with the chained read adjoint
        (g1, gs1, dH, dHh, dHr, dE1, c_eta, c_gam, c_gp, c_m, c_mp, c_R, c_Rp, c_D, c_Dp, c_game, c_me, c_be, c_Re,
         c_De, c_Lbe) = _step_adjoint(w1, s1, h, hh, hr, e1, QX1, QXh1, A1, XX1, Y1, T1, U1, do, d1, ds1, eta,
                                      gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, gam_e, m_e, b_e, R_e, D_e, Lb_e, n, DGD,
                                      P)  # fmt: skip
        dH += (dHh - _rowdot(dHh, hh)[:, None] * hh) / nrm[:, None]  # through h_hat = h / |h|
        dzr = dHr * _dsigma(zr, ACT)
        (g2, gs2, dK, dKh, dq, dE2, c_eta2, c_gam2, c_gp2, c_m2, c_mp2, c_R2, c_Rp2, c_D2, c_Dp2, c_game2, c_me2,
         c_be2, c_Re2, c_De2, c_Lbe2) = _step_adjoint(w2, s2, k, kh, q, e2, QX2, QXh2, A2, XX2, Y2, T2, U2, dzr, d2,
                                                      ds2, eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, gam_e, m_e, b_e,
                                                      R_e, D_e, Lb_e, n, DGD, P)  # fmt: skip
        dq += do  # the residual of Eq. 89
        # the frozen surprise: e1 = -eta r, e2 = -eta (r W1 ∘ σ'(z)), r = k + σ(z) W1ᵀ - v_t (L2) or -v_t (dot)
        c_eta += c_eta2 - _rowdot(dE1, r) - _rowdot(dE2, back)
        dback = -eta[:, None] * dE2
        dsz = _dsigma(z, ACT)
        drW1 = dback * dsz
        dr = -eta[:, None] * dE1 + _mm(drW1, tl.trans(w1), P)
        g1 += _mm(tl.trans(r), drW1, P)
        dz = dback * rW1 * _d2sigma(z, ACT)
        if L2:
            dK += dr
            dH += _mm(dr, w1, P)
            g1 += _mm(tl.trans(dr), h, P)
        dz += dH * dsz
        dK += _mm(dz, w2, P)
        g2 += _mm(tl.trans(dz), k, P)
        dv = -dr
        if SELF_VALUES:  # v_t = v + W1 σ(W2 v) at the chunk start
            zv = _mm(v, tl.trans(w2), P)
            g1 -= _mm(tl.trans(dr), _sigma(zv, ACT), P)
            dzv = -_mm(dr, w1, P) * _dsigma(zv, ACT)
            g2 += _mm(tl.trans(dzv), v, P)
            dv += _mm(dzv, w2, P)
        if ANCHOR:  # noqa: SIM102 (compile-time switch around a run-time test): the last (open) chunk's start
            if j == N - 1:
                g1 += _load2(DA1 + bh * D * E, D, E)
                g2 += _load2(DA2 + bh * E * D, E, D)
        d1, d2, ds1, ds2 = g1, g2, gs1, gs2
        _store2(DQ + c * n * D, dq, n, D)
        _store2(DK + c * n * D, dK, n, D)
        _store2(DKH + c * n * D, dKh, n, D)
        _store2(DV + c * n * D, dv, n, D)
        tl.store(CETA + c * n + an, c_eta)
        tl.store(CGAM + c * n + an, c_gam + c_gam2)
        tl.store(CGAMP + c * n + an, c_gp + c_gp2)
        tl.store(CMM + c * n + an, c_m + c_m2)
        tl.store(CMMP + c * n + an, c_mp + c_mp2)
        _store2(CRM + c * n * n, c_R + c_R2, n, n)
        _store2(CRP + c * n * n, c_Rp + c_Rp2, n, n)
        _store2(CDM + c * n * n, c_D + c_D2, n, n)
        _store2(CDP + c * n * n, c_Dp + c_Dp2, n, n)
        tl.store(CGAME + c, c_game + c_game2)
        tl.store(CME + c, c_me + c_me2)
        tl.store(CBE + c, c_be + c_be2)
        tl.store(CRE + c * n + an, c_Re + c_Re2)
        tl.store(CDE + c * n + an, c_De + c_De2)
        tl.store(CLBE + c * n + an, c_Lbe + c_Lbe2)
    _store_state(DW1, DW2, DS1, DS2, bh, d1, d2, ds1, ds2, D, E)


def launch_mlp_forward(
    x: list[Tensor], coef: list[Tensor], state: list[Tensor], starts: list[Tensor], out: Tensor, *,
    eps: float, dgd: bool, self_values: bool, l2: bool, act: str,
) -> None:  # fmt: skip
    """Run `_mlp_forward_kernel`: `x = (q, k, k̂, v)` `[B, H, N, n, D]`, `coef` the 15 `_Coef` fields, `state =
    (W1, W2, S1, S2)` contiguous float32 (overwritten with the final state), `starts` the four `[B, H, N, ...]`
    start-state buffers, `out [B, H, N, n, D]`."""
    B, H, N, n, D = x[0].shape
    E = state[0].shape[-1]
    precision = "ieee" if out.device.type == "cpu" else "tf32x3"
    _mlp_forward_kernel[(B * H,)](
        *x, *coef, *state, *starts, out, N, eps, n=n, LOGN=n.bit_length() - 1, D=D, E=E, DGD=dgd,
        SELF_VALUES=self_values, L2=l2, ACT=ACTIVATIONS[act], P=precision, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )  # fmt: skip


def launch_mlp_backward(
    x: list[Tensor], coef: list[Tensor], starts: list[Tensor], dout: Tensor, d_state: list[Tensor],
    d_anchor: list[Tensor] | None, dx: list[Tensor], dcoef: list[Tensor], *,
    eps: float, dgd: bool, self_values: bool, l2: bool, act: str,
) -> None:  # fmt: skip
    """Run `_mlp_backward_kernel`: `x`, `coef`, `starts` as the forward's; `dout [B, H, N, n, D]`; `d_state` the
    final state's adjoint (contiguous float32, overwritten with the initial state's); `d_anchor` the anchor's
    adjoint (W1, W2) when the call ends inside its last chunk, else None; `dx = (dq, dk, dk̂, dv)` and `dcoef` (the
    15 `_Coef` fields' shapes) are filled."""
    B, H, N, n, D = x[0].shape
    E = d_state[0].shape[-1]
    precision = "ieee" if dout.device.type == "cpu" else "tf32x3"
    anchor = d_anchor if d_anchor is not None else d_state[:2]
    _mlp_backward_kernel[(B * H,)](
        *x, *coef, *starts, dout, *d_state, *anchor, *dx, *dcoef, N, eps, n=n, LOGN=n.bit_length() - 1, D=D, E=E,
        DGD=dgd, SELF_VALUES=self_values, L2=l2, ACT=ACTIVATIONS[act], ANCHOR=d_anchor is not None, P=precision,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
