"""The Triton kernels of `fused.py` (imported only when a kernel is launched, so that importing nestlearn does not
import Triton).

What this is: `_system_inverse_kernel` (every chunk's DGD system inverted, in parallel over chunks) and
`_linear_fwd_kernel` (the sequential pass over the chunks). What it is not: the launch, the dispatch or the
autograd wiring (`fused.py`).
"""

import triton
import triton.language as tl

next_power_of_2 = triton.next_power_of_2


@triton.jit
def _row(m, ar, i):
    """Row `i` of a `[R, X]` tile as a `[X]` vector (register tiles cannot be indexed)."""
    return tl.sum(tl.where(ar[:, None] == i, m, 0.0), axis=0)


@triton.jit
def _system_inverse_kernel(
    K, ETA, ALPHA, TINV, T, H, N, eps, sq_b, sq_t, sq_h, sg_b, sg_t, sg_h,
    C: tl.constexpr, BC: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """`(I + diag(eta)(Rp ∘ X̂X̂ᵀ))⁻¹` of chunk `program_id(0)`: state-independent, so every chunk's inverse is
    formed in parallel before the sequential pass (forward substitution on the identity, row by row)."""
    j, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    ar = tl.arange(0, BC)
    ad = tl.arange(0, D)
    rows = j * C + ar
    valid = (ar < C) & (rows < T)
    kk = tl.load(K + b * sq_b + rows[:, None] * sq_t + h * sq_h + ad[None, :], mask=valid[:, None], other=0.0)
    kk = kk.to(tl.float32)
    gate = b * sg_b + rows * sg_t + h * sg_h
    eta = tl.load(ETA + gate, mask=valid, other=0.0).to(tl.float32)
    a_prev = tl.load(ALPHA + gate - sg_t, mask=valid & (ar > 0), other=1.0).to(tl.float32)
    strict = ar[:, None] > ar[None, :]
    before = ar[:, None] > ar[None, :] + 1
    Rp = tl.where(strict, tl.cumprod(tl.where(before, a_prev[:, None], 1.0), axis=0), 0.0)
    xh = kk * tl.rsqrt(tl.sum(kk * kk, axis=1) + eps * eps)[:, None]
    low = eta[:, None] * Rp * tl.dot(xh, tl.trans(xh), input_precision="ieee")  # strictly lower
    inv = tl.zeros((BC, BC), dtype=tl.float32)
    for i in range(BC):
        row = tl.where(ar == i, 1.0, 0.0) - tl.sum(_row(low, ar, i)[:, None] * inv, axis=0)
        inv = tl.where(ar[:, None] == i, row[None, :], inv)
    tl.store(TINV + ((b * H + h) * N + j) * BC * BC + ar[:, None] * BC + ar[None, :], inv)


@triton.jit
def _linear_fwd_kernel(
    Q, K, V, ETA, ALPHA, BETA,  # [B, T, H, D] x3, [B, T, H] x3
    W0, S0,  # [B, H, D, D] chunk-0 start state (float32)
    O,  # [B, T, H, D] reads (float32)
    WS, SS,  # [B, H, NS, D, D] the start state of every GROUP-th chunk (float32), written when SAVE
    WF, SF, WA,  # [B, H, D, D] the state after the last token, and W at the last chunk's start (float32)
    TINV,  # [B, H, N, BC, BC] the inverse of each chunk's DGD system (`_system_inverse_kernel`)
    T, H, N, NS, GROUP, eps,
    sq_b, sq_t, sq_h,  # strides of q / k / v / o (last dim contiguous)
    sg_b, sg_t, sg_h,  # strides of the gates
    C: tl.constexpr, BC: tl.constexpr, D: tl.constexpr, BV: tl.constexpr,
    DGD: tl.constexpr, L2: tl.constexpr, SAVE: tl.constexpr,
):  # fmt: skip
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    ar = tl.arange(0, BC)  # token rows of a chunk
    ad = tl.arange(0, D)  # input dims
    av = pid_v * BV + tl.arange(0, BV)  # this program's output rows of W
    st_off = (b * H + h) * D * D + av[:, None] * D + ad[None, :]  # [BV, D] into a [D, D] state
    w = tl.load(W0 + st_off)
    s = tl.load(S0 + st_off)
    lower = ar[:, None] >= ar[None, :]  # t >= r
    strict = ar[:, None] > ar[None, :]
    for j in range(N):
        t0 = j * C
        rows = t0 + ar
        valid = (ar < C) & (rows < T)
        # -- inputs of the chunk (padding: k = q = v = 0, eta = 0, alpha = beta = 1) --
        vec = b * sq_b + rows[:, None] * sq_t + h * sq_h
        kk = tl.load(K + vec + ad[None, :], mask=valid[:, None], other=0.0).to(tl.float32)  # [BC, D]
        qq = tl.load(Q + vec + ad[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        vv = tl.load(V + vec + av[None, :], mask=valid[:, None], other=0.0).to(tl.float32)  # [BC, BV]
        gate = b * sg_b + rows * sg_t + h * sg_h
        eta = tl.load(ETA + gate, mask=valid, other=0.0).to(tl.float32)
        alpha = tl.load(ALPHA + gate, mask=valid, other=1.0).to(tl.float32)
        beta = tl.load(BETA + gate, mask=valid, other=1.0).to(tl.float32)
        a_prev = tl.load(ALPHA + gate - sg_t, mask=valid & (ar > 0), other=1.0).to(tl.float32)  # alpha_{t-1}
        if j == N - 1:
            tl.store(WA + st_off, w)
        if SAVE:  # noqa: SIM102 (a compile-time switch around a runtime test: Triton keeps them apart)
            if j % GROUP == 0:
                so = ((b * H + h) * NS + j // GROUP) * D * D + av[:, None] * D + ad[None, :]
                tl.store(WS + so, w)
                tl.store(SS + so, s)
        # -- gate products (chunk.py's module docstring): R[t, r], Lb[t, s], their previous-row forms --
        R = tl.where(lower, tl.cumprod(tl.where(strict, alpha[:, None], 1.0), axis=0), 0.0)
        Lb = tl.where(lower, tl.cumprod(tl.where(strict, beta[:, None], 1.0), axis=0), 0.0)
        before = ar[:, None] > ar[None, :] + 1
        Rp = tl.where(strict, tl.cumprod(tl.where(before, a_prev[:, None], 1.0), axis=0), 0.0)  # R[t-1, r]
        gam = tl.cumprod(alpha, axis=0)  # Γ_t
        gam_p = tl.cumprod(a_prev, axis=0)  # Γ_{t-1}
        bb = tl.cumprod(beta, axis=0)  # b_t
        Dm = tl.dot(R, Lb, input_precision="ieee")  # D = R Lβ
        Dp = tl.dot(Rp, Lb, input_precision="ieee")
        m = tl.sum(R * bb[None, :], axis=1)  # m = R b
        mp = tl.sum(Rp * bb[None, :], axis=1)
        # -- frozen errors at the chunk start (Eq. 93): E = -eta dl/dy --
        y0 = tl.dot(kk, tl.trans(w), input_precision="ieee")  # [BC, BV]
        g = y0 - vv if L2 else -vv
        e = -eta[:, None] * g
        xh = kk * tl.rsqrt(tl.sum(kk * kk, axis=1) + eps * eps)[:, None]
        qx = tl.dot(qq, tl.trans(kk), input_precision="ieee")  # [BC, BC]
        read = (
            gam[:, None] * tl.dot(qq, tl.trans(w), input_precision="ieee")
            + m[:, None] * tl.dot(qq, tl.trans(s), input_precision="ieee")
            + tl.dot(Dm * qx, e, input_precision="ieee")
        )
        # -- the chunk-end row of the last real token --
        last = tl.minimum(C, T - t0) - 1
        R_e = _row(R, ar, last)
        D_e = _row(Dm, ar, last)
        Lb_e = _row(Lb, ar, last)
        gam_e = tl.sum(tl.where(ar == last, gam, 0.0), axis=0)
        m_e = tl.sum(tl.where(ar == last, m, 0.0), axis=0)
        b_e = tl.sum(tl.where(ar == last, bb, 0.0), axis=0)
        w_new = gam_e * w + m_e * s + tl.dot(tl.trans(e * D_e[:, None]), kk, input_precision="ieee")
        s_new = b_e * s + tl.dot(tl.trans(e * Lb_e[:, None]), kk, input_precision="ieee")
        if DGD:
            # U = (I + diag(eta)(Rp ∘ X̂X̂ᵀ))⁻¹ (-eta ⊙ Y), Y = Γp X̂Wᵀ + mp X̂Sᵀ + (Dp ∘ X̂Xᵀ) E
            xx = tl.dot(xh, tl.trans(kk), input_precision="ieee")
            rhs = -eta[:, None] * (
                gam_p[:, None] * tl.dot(xh, tl.trans(w), input_precision="ieee")
                + mp[:, None] * tl.dot(xh, tl.trans(s), input_precision="ieee")
                + tl.dot(Dp * xx, e, input_precision="ieee")
            )
            inv = ((b * H + h) * N + j) * BC * BC + ar[:, None] * BC + ar[None, :]
            u = tl.dot(tl.load(TINV + inv), rhs, input_precision="ieee")
            qxh = tl.dot(qq, tl.trans(xh), input_precision="ieee")
            read += tl.dot(R * qxh, u, input_precision="ieee")
            w_new += tl.dot(tl.trans(u * R_e[:, None]), xh, input_precision="ieee")
        tl.store(O + vec + av[None, :], read, mask=valid[:, None])
        w, s = w_new, s_new
    tl.store(WF + st_off, w)
    tl.store(SF + st_off, s)
