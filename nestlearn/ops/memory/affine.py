"""The linear memory as an affine recurrence over chunk-boundary states: every chunk's algebra at once, one scan.

What this is: `memory_affine(q, k, v, eta, alpha, beta, *, state, spec, chunk_size)`, the same function as
`memory_chunk` (same signature and semantics: D5's chunk-start gradients and inclusive reads, DGD, momentum, decay,
self-generated values) for the linear memory `M(x) = W x`. Its frozen errors are affine in the chunk-start weights
(Eq. 93 at the chunk start; L2 or dot objective, no clip):

    E = P W_cᵀ + E0,   P = -eta ⊙ K (+ eta ⊙ V with self-generated values), E0 = eta ⊙ V (0 with them)

so `chunk.py`'s key operator, which maps `[W_cᵀ; S_cᵀ; E]` linearly to the reads and the chunk-end state, becomes
an affine map of the start state `X_c = [W_cᵀ; S_cᵀ]` (`[2i, o]`):

    reads_c = A_c X_c + a_c,      X_{c+1} = M_c X_c + F_c.

`A, a, M, F` depend on the inputs and gates only, so they are built for all chunks at once by batched products
(plain PyTorch under autograd); the sequential part is the scan over `X` (`scan.affine_scan`, one Triton launch
each way on CUDA). Activation memory: every boundary state and every chunk's `M_c` (`2i x 2i`), i.e. about
`3 T / C` states, plus the batched operators.
What it is not: the MLP memory (its errors are not affine in the weights), a call that finishes a chunk an earlier
call opened (`state.offset > 0`: `memory_chunk` does that), or the gradient clip (not affine).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk import _Coef, _key_operator, _KeyOp, chunk_layout
from .common import MemorySpec, MemoryState, check_inputs, compute_dtype, normalize
from .scan import affine_scan


def supports(spec: MemorySpec, state: MemoryState) -> bool:
    """Whether `memory_affine` computes this call: the linear memory without the gradient clip, from a chunk
    boundary."""
    return spec.kind == "linear" and spec.max_grad_norm is None and state.offset == 0


def memory_affine(
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
    kernel: bool = False,
) -> tuple[Tensor, MemoryState]:
    """`memory_chunk` for the linear memory through the affine scan (module docstring); arguments and results as
    `memory_naive`; `kernel`: the scan as the Triton kernel (float32 only; `fused.memory_fused` sets it), else
    the PyTorch loop. Shapes: q, k, v `[B, T, H, D]`; gates `[B, T, H]`; state weights `[B, H, D, D]`."""
    alpha, beta = check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    if not supports(spec, state):
        raise ValueError(
            "memory_affine covers the linear memory without the gradient clip, for calls that start at a chunk "
            "boundary (state.offset == 0); use memory_chunk (or impl='auto', which falls back to it)"
        )
    dt, out_dtype = compute_dtype(q, k, v, eta, *state.weights, *state.momenta), q.dtype
    B, T, H, D = q.shape
    q, k, v, coef = chunk_layout([x.to(dt) for x in (q, k, v, eta, alpha, beta)], chunk_size)  # [B, H, N, n, D]
    N, n = q.shape[2:4]
    op = _key_operator(k, normalize(k, spec.norm_eps), q, coef, spec.dgd)
    A, a, M, F = chunk_maps(op, coef, k, v, spec)
    w0, s0 = state.weights[0].to(dt), state.momenta[0].to(dt)
    Xs = affine_scan(M, F, torch.cat([w0.mT, s0.mT], dim=-2), kernel)  # [B, H, N + 1, 2D, D]
    reads = A @ Xs[:, :, :N] + a  # [B, H, N, n, D]
    o = reads.reshape(B, H, N * n, D)[:, :, :T].transpose(1, 2).to(out_dtype)
    w, s = Xs[:, :, N, :D].mT, Xs[:, :, N, D:].mT
    offset = T % chunk_size  # a call that ends inside a chunk leaves it open for the next one (D5, D12)
    anchor = Xs[:, :, N - 1, :D].mT if offset else w
    return o, MemoryState((w,), (s,), (anchor,), offset)


def chunk_maps(op: _KeyOp, c: _Coef, k: Tensor, v: Tensor, spec: MemorySpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every chunk's affine maps from `X_c = [W_cᵀ; S_cᵀ]` (`[2i, o]`) to its reads and its end state.

    Inputs as `chunk.py`'s: `op` the key operator, `c` the gate products, k, v `[B, H, N, n, D]`.
    -> A `[B, H, N, n, 2i]`, a `[B, H, N, n, o]` (reads = A X + a), M `[B, H, N, 2i, 2i]`, F `[B, H, N, 2i, o]`.
    """
    i, n = k.shape[-1], k.shape[-2]
    P, E0 = _error_map(k, v, c.eta[..., None], spec)
    rw, rs, re = op.rows[..., :i], op.rows[..., i : 2 * i], op.rows[..., 2 * i :]
    A = torch.cat([rw + re @ P, rs], dim=-1)  # rows @ [Wᵀ; Sᵀ; P Wᵀ + E0]
    a = re @ E0
    zero = torch.zeros_like(P)
    PX = torch.cat([P, zero], dim=-1)  # E = PX X + E0
    if spec.dgd:  # the first n rows are the DGD vectors U, then the reads
        pe_u, pe_e = op.pe[..., :n], op.pe[..., n:]
        mw, fw = pe_u @ A[..., :n, :] + pe_e @ PX, pe_u @ a[..., :n, :] + pe_e @ E0
        A, a = A[..., n:, :], a[..., n:, :]
    else:
        mw, fw = op.pe @ PX, op.pe @ E0
    eye = torch.eye(i, dtype=k.dtype, device=k.device)
    carried_w = torch.cat([_times(c.gam_e, eye), _times(c.m_e, eye)], dim=-1)  # Γe Wᵀ + me Sᵀ
    carried_s = torch.cat([torch.zeros_like(eye).expand(*c.b_e.shape, i, i), _times(c.b_e, eye)], dim=-1)
    M = torch.cat([carried_w + mw, carried_s + op.ke @ PX], dim=-2)
    F = torch.cat([fw, op.ke @ E0], dim=-2)
    return A, a, M, F


def _error_map(k: Tensor, v: Tensor, eta: Tensor, spec: MemorySpec) -> tuple[Tensor, Tensor]:
    """`(P, E0)` with the frozen errors `E = -eta dl/dy = P W_cᵀ + E0` (Eq. 93), eta `[..., n, 1]`. D3: L2
    `dl/dy = W_c k - v_t`, dot `dl/dy = -v_t`; the target `v_t` is `v`, or the self-generated `W_c v` (Eqs. 84 /
    91), which is linear in `W_c` too."""
    grad_k = -eta * k if spec.objective == "l2" else torch.zeros_like(k)  # the `W_c k` term (L2 only)
    if spec.self_values:  # the target term `+eta W_c v` joins P
        return grad_k + eta * v, torch.zeros_like(v)
    return grad_k, eta * v  # a constant target


def _times(a: Tensor, eye: Tensor) -> Tensor:
    """`a [...] * I` -> `[..., i, i]`."""
    return a[..., None, None] * eye
