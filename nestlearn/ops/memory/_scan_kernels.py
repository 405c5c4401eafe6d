"""The Triton kernel of `scan.py` (imported only when it is launched, so that importing nestlearn does not import
Triton).

What this is: `_scan_kernel`, one program per (sequence x head, block of `BO` columns of the state) walking the
chunks in order: `Y_{c+1} = M_c Y_c + F_c` (forward) or, with `TRANSPOSE`, `Y_c = F_c + M_cᵀ Y_{c+1}` walking
back (the adjoint). The columns of the state are independent under a left multiplication, which is what splits
them over programs; the state block is re-read from the output it was just written to (L2-resident), and the
products keep float32 accuracy (D8) on tensor cores (`tf32x3`). What it is not: the launch's autograd wiring.
"""

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _scan_kernel(
    M,  # [BH, N, R, R]
    F,  # [BH, N, R, O]   (the adjoint: dXs [BH, N + 1, R, O])
    Y,  # [BH, N + 1, R, O], Y[:, 0] (the adjoint: Y[:, N]) already written
    N,
    R: tl.constexpr, O: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
    TRANSPOSE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_o, bh = tl.program_id(0), tl.program_id(1)
    ao = pid_o * BO + tl.arange(0, BO)
    col = ao < O
    FN = N + 1 if TRANSPOSE else N
    for j in range(N):
        if TRANSPOSE:
            c, src, dst = N - 1 - j, N - j, N - 1 - j  # Λ_c = dX_c + M_cᵀ Λ_{c+1}
        else:
            c, src, dst = j, j, j + 1  # X_{c+1} = M_c X_c + F_c
        m_base = M + (bh * N + c).to(tl.int64) * R * R
        f_base = F + (bh * FN + c).to(tl.int64) * R * O
        y_src = Y + (bh * (N + 1) + src).to(tl.int64) * R * O
        y_dst = Y + (bh * (N + 1) + dst).to(tl.int64) * R * O
        for rb in tl.static_range(0, R, BR):
            ar = rb + tl.arange(0, BR)
            row = ar < R
            acc = tl.load(f_base + ar[:, None] * O + ao[None, :], mask=row[:, None] & col[None, :], other=0.0)
            for kb in tl.static_range(0, R, BK):
                ak = kb + tl.arange(0, BK)
                inner = ak < R
                if TRANSPOSE:  # (M_cᵀ)[r, k] = M_c[k, r]
                    m = tl.load(m_base + ak[None, :] * R + ar[:, None], mask=row[:, None] & inner[None, :], other=0.0)
                else:
                    m = tl.load(m_base + ar[:, None] * R + ak[None, :], mask=row[:, None] & inner[None, :], other=0.0)
                y = tl.load(y_src + ak[:, None] * O + ao[None, :], mask=inner[:, None] & col[None, :], other=0.0)
                acc += tl.dot(m, y, input_precision=PRECISION)
            tl.store(y_dst + ar[:, None] * O + ao[None, :], acc, mask=row[:, None] & col[None, :])
        tl.debug_barrier()  # the next chunk reads what this one wrote (other threads of this program)


def launch_scan(M: Tensor, F: Tensor, Y: Tensor, *, transpose: bool) -> None:
    """Fill `Y [B, H, N + 1, R, O]` in place (see `_scan_kernel`); M `[B, H, N, R, R]`, F contiguous."""
    B, H, N1, R, O = Y.shape
    N = N1 - 1
    BR = BK = max(16, min(64, triton.next_power_of_2(R)))
    BO = max(16, min(32, triton.next_power_of_2(O)))
    grid = (triton.cdiv(O, BO), B * H)
    # tf32x3: three tensor-core products per float32 product, float32 accuracy (the FMA path, "ieee", measured 30x
    # slower on the H200); the interpreter knows only "ieee"
    precision = "ieee" if M.device.type == "cpu" else "tf32x3"
    _scan_kernel[grid](M, F, Y, N, R=R, O=O, BR=BR, BK=BK, BO=BO, TRANSPOSE=transpose, PRECISION=precision)
