"""The Triton kernel of the MLP memory's chunk recurrence, forward (imported only when it is launched, so that
importing nestlearn does not import Triton).

What this is: `_mlp_forward_kernel`, one program per (sequence x head) walking the chunks in order with the whole
state `(W1 [D, E], W2 [E, D], S1, S2)` on chip, computing exactly `adjoint.mlp_chunk` (the residual MLP memory
`M(x) = x + W1 σ(W2 x)`, Eq. 89, behind the frozen surprise of Eq. 93, generated quantities from the chunk-start
state, D5): per chunk the self-generated targets (Eq. 84), the inner loss's dl/dy and dl/dz at the chunk start,
then `adjoint.matrix_step` for W2 (inputs the keys) and for W1 (inputs σ(W2 k), read by σ(W2's reads)), the DGD
system `T = I + diag(eta)(R_prev ∘ X̂X̂ᵀ)` inverted as `(I - L)(I + L²)(I + L⁴)...` (L strictly lower, so the
product of log2(n) factors is exact). It writes every chunk's outputs, every chunk-start state (what the
written-out backward recomputes from) and the final state. The gate products (decay and momentum, `_Coef`) come
in precomputed, so the decay and momentum switches are in the data; DGD, self-generated values, the objective and
the activation are compile-time switches. What it is not: the backward (`adjoint.py` walks the chunks back from
the saved starts), the clip or the branch LayerNorm, or a kernel for large states: the state lives in registers,
so D and E are powers of two with D, n >= 16 and D * E <= 64 * 128 (`supports`).
"""

import triton
import triton.language as tl
from torch import Tensor

ACTIVATIONS = {"silu": 0, "gelu": 1, "tanh": 2}
MAX_STATE = 64 * 128  # D * E of one matrix held on chip per program


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
def _matrix_step(W, S, X, Xh, Q, Err, eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, gam_e, m_e, b_e, R_e, D_e, Lb_e,
                 n: tl.constexpr, LOGN: tl.constexpr, DGD: tl.constexpr, P: tl.constexpr):  # fmt: skip
    """`adjoint.matrix_step` on tiles: W, S `[o, i]`, X, Xh, Q `[n, i]`, Err `[n, o]` -> reads `[n, o]`, W', S'."""
    QX = _mm(Q, tl.trans(X), P)
    O = gam[:, None] * _mm(Q, tl.trans(W), P) + m[:, None] * _mm(Q, tl.trans(S), P) + _mm(Dm * QX, Err, P)
    Wn = gam_e * W + m_e * S + _mm(tl.trans(Err), D_e[:, None] * X, P)
    Sn = b_e * S + _mm(tl.trans(Err), Lb_e[:, None] * X, P)
    if DGD:
        A = _mm(Xh, tl.trans(Xh), P)
        XX = _mm(Xh, tl.trans(X), P)
        Y = gam_p[:, None] * _mm(Xh, tl.trans(W), P) + m_p[:, None] * _mm(Xh, tl.trans(S), P) + _mm(Dp * XX, Err, P)
        Tinv = _tri_inverse(eta[:, None] * (Rp * A), n, LOGN, P)
        U = _mm(Tinv, -eta[:, None] * Y, P)
        O += _mm(Rm * _mm(Q, tl.trans(Xh), P), U, P)
        Wn += _mm(tl.trans(U), R_e[:, None] * Xh, P)
    return O, Wn, Sn


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
    an = tl.arange(0, n)
    w1 = _load2(W1 + bh * D * E, D, E)
    w2 = _load2(W2 + bh * E * D, E, D)
    s1 = _load2(S1 + bh * D * E, D, E)
    s2 = _load2(S2 + bh * E * D, E, D)
    for j in range(N):
        c = bh * N + j
        _store2(STARTS1 + c * D * E, w1, D, E)
        _store2(STARTS2 + c * E * D, w2, E, D)
        _store2(STARTT1 + c * D * E, s1, D, E)
        _store2(STARTT2 + c * E * D, s2, E, D)
        q = _load2(Q + c * n * D, n, D)
        k = _load2(K + c * n * D, n, D)
        kh = _load2(KH + c * n * D, n, D)
        v = _load2(V + c * n * D, n, D)
        eta = tl.load(ETA + c * n + an)
        gam, gam_p = tl.load(GAM + c * n + an), tl.load(GAMP + c * n + an)
        m, m_p = tl.load(MM + c * n + an), tl.load(MMP + c * n + an)
        Rm, Rp = _load2(RM + c * n * n, n, n), _load2(RP + c * n * n, n, n)
        Dm, Dp = _load2(DM + c * n * n, n, n), _load2(DP + c * n * n, n, n)
        gam_e, m_e, b_e = tl.load(GAME + c), tl.load(ME + c), tl.load(BE + c)
        R_e, D_e, Lb_e = tl.load(RE + c * n + an), tl.load(DE + c * n + an), tl.load(LBE + c * n + an)
        # targets and the inner loss's gradient at the chunk start (Eqs. 84, 93)
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
        back = _mm(r, w1, P) * _dsigma(z, ACT)  # dl/dz [n, E]
        e1 = -eta[:, None] * r
        e2 = -eta[:, None] * back
        # W2 (inputs: the keys), then W1 (inputs: σ(W2 k), read by σ(W2's reads))
        zr, w2n, s2n = _matrix_step(w2, s2, k, kh, q, e2, eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, gam_e, m_e, b_e,
                                    R_e, D_e, Lb_e, n, LOGN, DGD, P)  # fmt: skip
        hr = _sigma(zr, ACT)
        hh = h / tl.sqrt(tl.sum(h * h, axis=1) + eps * eps)[:, None]
        o1, w1n, s1n = _matrix_step(w1, s1, h, hh, hr, e1, eta, gam, gam_p, m, m_p, Rm, Rp, Dm, Dp, gam_e, m_e, b_e,
                                    R_e, D_e, Lb_e, n, LOGN, DGD, P)  # fmt: skip
        _store2(OUT + c * n * D, q + o1, n, D)
        w1, w2, s1, s2 = w1n, w2n, s1n, s2n
    _store2(W1 + bh * D * E, w1, D, E)
    _store2(W2 + bh * E * D, w2, E, D)
    _store2(S1 + bh * D * E, s1, D, E)
    _store2(S2 + bh * E * D, s2, E, D)


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
        SELF_VALUES=self_values, L2=l2, ACT=ACTIVATIONS[act], P=precision, num_warps=8,
    )  # fmt: skip
