"""Affine scan over chunk-boundary states: `X_{c+1} = M_c X_c + F_c`, the only sequential step of `affine.py`.

What this is: `affine_scan(M, F, X0, kernel) -> Xs`, every boundary state of the recurrence, as a `torch.library` custom
op with a hand-written backward (the adjoint runs the same recurrence backwards, `Λ_c = dX_c + M_cᵀ Λ_{c+1}`, and
`dM_c = Λ_{c+1} X_cᵀ`, `dF_c = Λ_{c+1}` are batched products over all chunks at once). On CUDA both directions are
one Triton launch each (`_scan_kernels.py`: one program per (sequence, head, block of columns of X) walks the
chunks in order); elsewhere, and in float64, a PyTorch loop computes the same thing.
What it is not: the chunk algebra that builds `M` and `F` (`affine.py`), or a second-order op (the custom op's
backward is first order; `affine.py`'s callers take the chunk form when they need twice-differentiable code).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


@torch.library.custom_op("nestlearn::affine_scan", mutates_args=())
def affine_scan(M: Tensor, F: Tensor, X0: Tensor, kernel: bool) -> Tensor:
    """`Xs[:, :, 0] = X0`, `Xs[:, :, c + 1] = M[:, :, c] @ Xs[:, :, c] + F[:, :, c]`; `kernel`: the Triton kernel
    (float32, on CUDA or under Triton's interpreter), else the PyTorch loop (any dtype, any device).

    Shapes: M `[B, H, N, R, R]`, F `[B, H, N, R, O]`, X0 `[B, H, R, O]` -> Xs `[B, H, N + 1, R, O]`.
    """
    B, H, N, R, O = F.shape
    M, F = M.contiguous(), F.contiguous()
    Xs = torch.empty(B, H, N + 1, R, O, dtype=F.dtype, device=F.device)
    Xs[:, :, 0] = X0
    if kernel:
        from ._scan_kernels import launch_scan

        launch_scan(M, F, Xs, transpose=False)
        return Xs
    for c in range(N):
        Xs[:, :, c + 1] = F[:, :, c] + M[:, :, c] @ Xs[:, :, c]
    return Xs


@affine_scan.register_fake
def _(M: Tensor, F: Tensor, X0: Tensor, kernel: bool) -> Tensor:
    B, H, N, R, O = F.shape
    return F.new_empty(B, H, N + 1, R, O)


@torch.library.custom_op("nestlearn::affine_scan_adjoint", mutates_args=())
def affine_scan_adjoint(M: Tensor, dXs: Tensor, kernel: bool) -> Tensor:
    """The adjoint of `affine_scan`: `Λ_N = dXs_N`, `Λ_c = dXs_c + M_cᵀ Λ_{c+1}` -> Λ `[B, H, N + 1, R, O]`."""
    N = dXs.shape[2] - 1
    M, dXs = M.contiguous(), dXs.contiguous()
    lam = torch.empty_like(dXs)
    lam[:, :, N] = dXs[:, :, N]
    if kernel:
        from ._scan_kernels import launch_scan

        launch_scan(M, dXs, lam, transpose=True)
        return lam
    for c in reversed(range(N)):
        lam[:, :, c] = dXs[:, :, c] + M[:, :, c].mT @ lam[:, :, c + 1]
    return lam


@affine_scan_adjoint.register_fake
def _(M: Tensor, dXs: Tensor, kernel: bool) -> Tensor:
    return dXs.new_empty(dXs.shape)


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor, bool], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0], output)
    ctx.kernel = inputs[3]


def _backward(ctx: Any, dXs: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
    M, Xs = ctx.saved_tensors
    lam = affine_scan_adjoint(M, dXs, ctx.kernel)
    after = lam[:, :, 1:]
    return after @ Xs[:, :, :-1].mT, after, lam[:, :, 0], None


affine_scan.register_autograd(_backward, setup_context=_setup_context)
