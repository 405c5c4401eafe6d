"""The MLP memory's chunk form with a hand-derived backward: no autograd inside the chunk loop.

What this is: `memory_adjoint(q, k, v, eta, alpha, beta, *, state, spec, chunk_size)`, the same function as
`memory_chunk` (same signature and results) for the residual MLP memory `M(x) = x + W1 σ(W2 x)` (Eq. 89), whose
backward is written out: the forward runs the chunk loop without recording a graph and saves only every chunk's
start state `(W1, W2, S1, S2)`; the backward walks the chunks from the last to the first, recomputes each chunk from
its saved state and applies its adjoint equations, handing the start state's adjoint to the chunk before. What
does not depend on the state (the chunk layout, the keys' normalisation and the gate products of every chunk) is
differentiated once, batched over all chunks, from the adjoints the loop collects, by their adjoint written out too
(`chunk.chunk_layout_adjoint`, `_prepare_adjoint`).
The adjoint of one weight matrix over one chunk (`matrix_step_adjoint`) follows the chunk form's equations
(`chunk.py`, `_matrix_chunk`) in reverse: the chunk-end state, the reads (masked products), the unit-triangular
DGD system (its transpose solve through the explicit inverse), its right-hand side and its matrix. The MLP chains
two such steps (W1 reads `σ(W2_t q_t)`) behind the frozen surprise of Eq. 93 (and the self-generated targets of
Eqs. 84 / 91), each token's step scaled by the gradient clip's factor where the spec clips (the Titans variants'
memories; the factor is a function of chunk-start quantities, so its adjoint joins the surprise's). Activation
memory: one state per chunk boundary (or per `save_every` chunks, the rest recomputed); the per-chunk work is
the recompute plus about three times the forward's products, with no autograd bookkeeping. With `kernel=True`
each chunk loop runs as one Triton program per sequence and head (`_mlp_kernels.py`) where the state fits on
chip and the chunk is short enough for that direction's kernel (`kernel_supports`). Both directions are
`torch.library` custom ops (`nestlearn::adjoint_memory`, `nestlearn::adjoint_memory_backward`) with fake
implementations, so `torch.compile` (full graph), activation checkpointing and FSDP2 see one opaque op per call.
What it is not: the linear memory (`affine.py` covers it), Titans' branch LayerNorm (`memory_chunk` computes
it), a call that finishes a chunk an earlier call opened, or a second-order op.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .chunk import _Coef, _vector_chunks, chunk_layout_adjoint, chunk_layout_products
from .common import (
    MemorySpec,
    MemoryState,
    activation,
    check_inputs,
    check_save_every,
    clip_factor,
    compute_dtype,
    flush_subnormals,
    fresh,
    memory_apply,
    no_autocast,
    normalize,
    spec_args,
    spec_from_args,
    triton_available,
)


def supports(spec: MemorySpec, state: MemoryState) -> bool:
    """Whether `memory_adjoint` computes this call: the MLP memory without the branch LayerNorm (with or without
    the gradient clip), from a chunk boundary."""
    return spec.kind == "mlp" and not spec.out_norm and state.offset == 0


MAX_STATE = 64 * 128  # D * E of one weight matrix that a kernel program holds on chip
# The longest chunk each kernel takes: compiled for sm_90 (num_stages=1, D = 32, E = 128) the forward needs 212
# KiB of shared memory at 64 tokens and the backward 96 KiB (Hopper: 227); at 128 the forward would not fit.
# Longer chunks run that direction's PyTorch loop (docs/decisions.md).
MAX_CHUNK_FORWARD, MAX_CHUNK_BACKWARD = 64, 64
# Chunks over 32 tokens need heads of at least 32 and hidden widths of at least 64: on the H200 (Triton 3.6) both
# kernels at 64-token chunks with 16-wide heads (E = 32) computed wrong reads (float32 dots, relative error 0.2) or
# faulted (illegal memory access), where 16- and 32-token chunks at that shape and 64-token chunks at D = 32 with
# E = 64 or 128 agree with the loops (tests/ops/test_mlp_kernel.py; docs/decisions.md). Untried shapes in between
# (D = 32, E = 32) stay on the loop.
MIN_HEAD_AT_64, MIN_HIDDEN_AT_64 = 32, 64


def kernel_supports(q: Tensor, state: MemoryState, chunk_size: int, *, backward: bool = False) -> bool:
    """Whether the forward kernel (`backward=True`: the backward kernel, `_mlp_kernels.py`) takes this call: where
    a kernel runs (`triton_available`, the interpreter included), float32 state, chunks of 16 tokens up to
    `MAX_CHUNK_FORWARD` (`MAX_CHUNK_BACKWARD`) and head dims that are powers of two (D >= 16; for chunks over 32
    tokens D >= `MIN_HEAD_AT_64` and E >= `MIN_HIDDEN_AT_64`) with `D * E` within what a program holds."""
    W1 = state.weights[0]
    D, E = W1.shape[-2:]
    n = min(chunk_size, q.shape[1])
    pow2 = all(x >= 16 and x & (x - 1) == 0 for x in (n, D, E))
    tried = n <= 32 or (D >= MIN_HEAD_AT_64 and E >= MIN_HIDDEN_AT_64)  # shapes run on a GPU at long chunks
    short = n <= (MAX_CHUNK_BACKWARD if backward else MAX_CHUNK_FORWARD) and tried
    fits = pow2 and short and D * E <= MAX_STATE and W1.dtype == torch.float32 and q.dtype != torch.float64
    return fits and triton_available(q.device, interpret=True)


def memory_adjoint(
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
    save_every: int = 1,
) -> tuple[Tensor, MemoryState]:
    """`memory_chunk` for the MLP memory with the hand-derived backward (module docstring); arguments and results
    as `memory_naive`. Shapes: q, k, v `[B, T, H, D]`; gates `[B, T, H]`; W1 `[B, H, D, E]`, W2 `[B, H, E, D]`.
    `kernel`: the forward's chunk loop runs as one Triton program per sequence and head (`_mlp_kernels.py`; on CPU
    in Triton's interpreter), where `kernel_supports` says it can; the backward's likewise, where
    `kernel_supports(..., backward=True)` says it can. `save_every`: which chunk-start states the forward keeps for
    the backward: every chunk's (1), every `save_every`-th (the backward recomputes the others, a segment at a
    time: one more forward pass), or none (0: recomputed from the input state). The saved state memory is
    `ceil(N / save_every)` states instead of N; the results are the same."""
    check_save_every(save_every)
    alpha_full, beta_full = check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    if not supports(spec, state):
        raise ValueError(
            "memory_adjoint covers the MLP memory without the branch norm (out_norm), for calls that start "
            "at a chunk boundary (state.offset == 0); use memory_chunk"
        )
    kernels = [kernel and kernel_supports(q, state, chunk_size, backward=b) for b in (False, True)]
    outs = adjoint_memory(q, k, v, eta, alpha_full, beta_full, list(state.weights), list(state.momenta), chunk_size,
                          *spec_args(spec), *kernels, save_every, mixed_precision(q))  # fmt: skip
    o, w1, w2, s1, s2, a1, a2 = outs[:7]
    return o, MemoryState((w1, w2), (s1, s2), (a1, a2), q.shape[1] % chunk_size)


# ---------------------------------------------------------------------------------------------
# the state-independent inputs of every chunk (differentiated once, batched, by their written-out adjoint)


class _Prepared(NamedTuple):
    q: Tensor  # [B, H, N, n, D]
    k: Tensor
    kh: Tensor  # normalised keys (the W2 step's projector input)
    v: Tensor
    coef: _Coef  # fields [B, H, N, ...]
    mixed: bool  # the call runs under bf16 / float16 autocast (the kernels' dots: `_mlp_kernels.products`)
    products: tuple[Tensor, Tensor] | None = None  # the segment products of alpha and beta (`_prepare_adjoint`)

    def flat(self) -> list[Tensor]:
        return [self.q, self.k, self.kh, self.v, *self.coef]


def _prepare(seq: list[Tensor], C: int, spec: MemorySpec, mixed: bool) -> _Prepared:
    """Chunk layout (inert padding) and gate products of `seq = (q, k, v, eta, alpha, beta)` (`chunk_layout`), with
    the keys' normalisation; `mixed`: the call runs under bf16 / float16 autocast."""
    q, k, v, coef, products = chunk_layout_products(seq, C)
    return _Prepared(q, k, normalize(k, spec.norm_eps), v, coef, mixed, products)


def _prepare_adjoint(prep: _Prepared, T: int, spec: MemorySpec, grads: list[Tensor]) -> list[Tensor]:
    """The adjoint of `_prepare` over T tokens, written out: `grads` (those of `prep.flat()`) -> the adjoints of
    `(q, k, v, eta, alpha, beta)`. The keys' normalisation `k̂ = k r`, `r = (|k|² + eps²)^-1/2`, takes
    `dk += r dk̂ - r³ (k · dk̂) k`."""
    dq, dk, dkh, dv, *dcoef = grads
    r = torch.rsqrt(_rowdot(prep.k, prep.k) + spec.norm_eps**2)[..., None]
    dk = dk + r * dkh - (r**3 * _rowdot(prep.k, dkh)[..., None]) * prep.k
    assert prep.products is not None
    return chunk_layout_adjoint(T, prep.products, dq, dk, dv, _Coef(*dcoef))


# The device types autocast runs on, asked once at import: inside a compiled model torch 2.11's dynamo cannot trace
# `torch.amp.is_autocast_available` (a graph break at every memory call, found on the H200), a set lookup it can.
_AUTOCAST_DEVICES = frozenset(
    kind for kind in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(kind)
)  # fmt: skip


def mixed_precision(q: Tensor) -> bool:
    """Whether the caller runs under autocast to bf16 or float16 on `q`'s device (the model's own products round
    to 8 or 11 significant bits; the kernels then take one-pass tf32 dots: `_mlp_kernels.products`)."""
    kind = q.device.type
    if kind not in _AUTOCAST_DEVICES:  # e.g. meta tensors
        return False
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in (torch.bfloat16, torch.float16)


def _chunk_coef(coef: _Coef, j: int) -> _Coef:
    return _Coef(*(f[:, :, j] for f in coef))


# ---------------------------------------------------------------------------------------------
# one weight matrix over one chunk: forward and adjoint (the equations of chunk.py's `_matrix_chunk`)


class _Step(NamedTuple):
    """What one matrix step's adjoint reuses from its forward (None without DGD)."""

    QX: Tensor
    QXh: Tensor
    A: Tensor | None
    XX: Tensor | None
    Y: Tensor | None
    Tinv: Tensor | None
    U: Tensor | None


def _rows(a: Tensor, x: Tensor) -> Tensor:
    """Row scaling `diag(a) x`: a `[..., n]`, x `[..., n, k]`."""
    return a[..., None] * x


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _num(a: Tensor) -> Tensor:
    """A per-chunk scalar `[B, H]` as `[B, H, 1, 1]`."""
    return a[..., None, None]


def matrix_step(
    W: Tensor, S: Tensor, X: Tensor, Xh: Tensor, Q: Tensor, E: Tensor, c: _Coef, dgd: bool, ends: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None, _Step]:
    """Reads `O [B, H, n, o]` and the chunk-end `W', S'` of one matrix `W, S [B, H, o, i]` with layer inputs
    `X` (normalised `Xh`) and read inputs `Q` (`[B, H, n, i]`), frozen errors `E [B, H, n, o]`:

        O  = Γ ⊙ Q Wᵀ + m ⊙ Q Sᵀ + (R ∘ Q X̂ᵀ) U + (D ∘ Q Xᵀ) E
        W' = Γe W + me S + Uᵀ diag(Re) X̂ + Eᵀ diag(De) X,      S' = be S + Eᵀ diag(Lβe) X
        U  = T⁻¹ (-eta ⊙ Y),  T = I + diag(eta)(Rp ∘ X̂X̂ᵀ),  Y = Γp ⊙ X̂ Wᵀ + mp ⊙ X̂ Sᵀ + (Dp ∘ X̂ Xᵀ) E  (DGD only)

    `ends=False` skips `W', S'` (None): the backward's recompute needs only the reads and `_Step`.
    """
    QX, QXh = Q @ X.mT, Q @ Xh.mT
    O = _rows(c.gam, Q @ W.mT) + _rows(c.m, Q @ S.mT) + (c.D * QX) @ E
    Wn = _num(c.gam_e) * W + _num(c.m_e) * S + E.mT @ _rows(c.D_e, X) if ends else None
    Sn = _num(c.b_e) * S + E.mT @ _rows(c.Lb_e, X) if ends else None
    if not dgd:
        return O, Wn, Sn, _Step(QX, QXh, None, None, None, None, None)
    A, XX = Xh @ Xh.mT, Xh @ X.mT
    Y = _rows(c.gam_prev, Xh @ W.mT) + _rows(c.m_prev, Xh @ S.mT) + (c.D_prev * XX) @ E
    eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    Tinv = torch.linalg.solve_triangular(eye + c.eta[..., None] * (c.R_prev * A), eye, upper=False, unitriangular=True)
    U = Tinv @ _rows(-c.eta, Y)
    Wn = Wn + U.mT @ _rows(c.R_e, Xh) if Wn is not None else None
    return O + (c.R * QXh) @ U, Wn, Sn, _Step(QX, QXh, A, XX, Y, Tinv, U)


def _state_term_adjoint(
    W: Tensor, S: Tensor, Z: Tensor, a: Tensor, b: Tensor, dP: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The adjoint of `P = a ⊙ Z Wᵀ + b ⊙ Z Sᵀ` (Z `[n, i]`, a, b `[n]`): -> `(dW, dS, dZ, da, db)`."""
    dPW, dPS = dP @ W, dP @ S
    return _rows(a, dP).mT @ Z, _rows(b, dP).mT @ Z, _rows(a, dPW) + _rows(b, dPS), _rowdot(dPW, Z), _rowdot(dPS, Z)


def _masked_adjoint(mask: Tensor, FG: Tensor, H: Tensor, dP: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The adjoint of the masked product `P = (mask ∘ FG) H` (FG a gram `F Gᵀ`): -> `(dH, dmask, dFG)`; the caller
    turns `dFG` into `dF = dFG G`, `dG = dFGᵀ F`."""
    N = dP @ H.mT
    return (mask * FG).mT @ dP, N * FG, N * mask


def matrix_step_adjoint(
    W: Tensor, S: Tensor, X: Tensor, Xh: Tensor, Q: Tensor, E: Tensor, c: _Coef, st: _Step,
    dO: Tensor, dWn: Tensor, dSn: Tensor, dc: dict[str, Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The adjoint of `matrix_step` from `dO, dW', dS'`: -> `(dW, dS, dX, dX̂, dQ, dE)`; the gate products'
    adjoints are added to `dc` (field name -> tensor of that field's shape)."""
    # chunk-end momentum S' and weight W'
    dS = _num(c.b_e) * dSn + _num(c.m_e) * dWn
    dW = _num(c.gam_e) * dWn
    dc["b_e"] += (dSn * S).sum((-1, -2))
    dc["gam_e"] += (dWn * W).sum((-1, -2))
    dc["m_e"] += (dWn * S).sum((-1, -2))
    EdS, EdW = E @ dSn, E @ dWn
    dE = _rows(c.Lb_e, X @ dSn.mT) + _rows(c.D_e, X @ dWn.mT)
    dX = _rows(c.Lb_e, EdS) + _rows(c.D_e, EdW)
    dc["Lb_e"] += _rowdot(EdS, X)
    dc["D_e"] += _rowdot(EdW, X)
    # reads: O = Γ ⊙ Q Wᵀ + m ⊙ Q Sᵀ + (R ∘ Q X̂ᵀ) U + (D ∘ Q Xᵀ) E
    gW, gS, dQ, dc_gam, dc_m = _state_term_adjoint(W, S, Q, c.gam, c.m, dO)
    dW, dS = dW + gW, dS + gS
    dc["gam"] += dc_gam
    dc["m"] += dc_m
    gE, dc_D, G2 = _masked_adjoint(c.D, st.QX, E, dO)
    dE = dE + gE
    dc["D"] += dc_D
    dQ = dQ + G2 @ X
    dX = dX + G2.mT @ Q
    if st.U is None:
        return dW, dS, dX, torch.zeros_like(Xh), dQ, dE
    assert st.A is not None and st.XX is not None and st.Y is not None and st.Tinv is not None
    U = st.U
    UdW = U @ dWn
    gU, dc_R, G1 = _masked_adjoint(c.R, st.QXh, U, dO)
    dU = _rows(c.R_e, Xh @ dWn.mT) + gU
    dXh = _rows(c.R_e, UdW) + G1.mT @ Q
    dc["R_e"] += _rowdot(UdW, Xh)
    dc["R"] += dc_R
    dQ = dQ + G1 @ Xh
    # the DGD system: U = T⁻¹ rhs, rhs = -eta ⊙ Y, Y = Γp ⊙ X̂ Wᵀ + mp ⊙ X̂ Sᵀ + (Dp ∘ X̂ Xᵀ) E
    drhs = st.Tinv.mT @ dU
    dT = -(drhs @ U.mT).tril(-1)  # T's diagonal is the constant 1 and its upper triangle 0
    dc["eta"] += -_rowdot(drhs, st.Y) + (dT * c.R_prev * st.A).sum(-1)
    dY = _rows(-c.eta, drhs)
    gW, gS, gXh, dc_gp, dc_mp = _state_term_adjoint(W, S, Xh, c.gam_prev, c.m_prev, dY)
    dW, dS, dXh = dW + gW, dS + gS, dXh + gXh
    dc["gam_prev"] += dc_gp
    dc["m_prev"] += dc_mp
    gE, dc_Dp, dXX = _masked_adjoint(c.D_prev, st.XX, E, dY)
    dE = dE + gE
    dc["D_prev"] += dc_Dp
    dXh = dXh + dXX @ X
    dX = dX + dXX.mT @ Xh
    # T = I + diag(eta)(Rp ∘ X̂ X̂ᵀ)
    dc["R_prev"] += c.eta[..., None] * (dT * st.A)
    dA = c.eta[..., None] * (dT * c.R_prev)
    dXh = dXh + (dA + dA.mT) @ Xh
    return dW, dS, dX, dXh, dQ, dE


# ---------------------------------------------------------------------------------------------
# the MLP memory over one chunk (Eq. 89 behind the frozen surprise of Eq. 93)


def _second_derivative(name: str, z: Tensor) -> Tensor:
    """σ''(z) of the MLP memory's activation."""
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    if name == "gelu":
        return torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5 * (2 - z * z)
    t = torch.tanh(z)
    return -2 * t * (1 - t * t)


class _Chunk(NamedTuple):
    """One chunk's forward quantities, kept for its adjoint."""

    vt: Tensor  # targets (v, or M_c(v) with self-generated values)
    z: Tensor
    h: Tensor
    hh: Tensor  # normalised h (W1's projector input)
    r: Tensor  # dl/dy of the inner loss at the chunk start
    rW1: Tensor
    back: Tensor  # dl/dz
    sq: Tensor | None  # ||G_t||^2 of the token's inner gradient, `[B, H, n]` (the clip's input; None: no clip)
    cf: Tensor | None  # the clip factor `c / max(c, ||G_t||)`
    e1: Tensor
    e2: Tensor
    zr: Tensor  # W2's reads
    hr: Tensor  # σ(W2's reads): W1's read inputs
    step2: _Step
    step1: _Step


def mlp_chunk(
    weights: tuple[Tensor, Tensor, Tensor, Tensor], x: tuple[Tensor, Tensor, Tensor, Tensor], c: _Coef,
    spec: MemorySpec, ends: bool = True,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor], _Chunk]:  # fmt: skip
    """`o = q + W1_t σ(W2_t q_t)` over one chunk and the chunk-end `(W1, W2, S1, S2)`; x = (q, k, k̂, v).
    `ends=False` (the backward's recompute) skips the chunk-end state (`weights` comes back as given)."""
    W1, W2, S1, S2 = weights
    q, k, kh, v = x
    sigma, dsigma = activation(spec.activation)
    vt = memory_apply((W1, W2), v, spec) if spec.self_values else v
    z = k @ W2.mT
    h = sigma(z)
    r = k + h @ W1.mT - vt if spec.objective == "l2" else -vt
    rW1 = r @ W1
    back = rW1 * dsigma(z)
    # the clip (Titans' memories): each token's gradient `G_t = (r hᵀ, back kᵀ)` scaled to at most the max norm,
    # i.e. its step `-eta_t` times `cf_t` (chunk.py's `_step`; DGD's system keeps eta itself)
    sq = cf = None
    step = -c.eta
    if spec.max_grad_norm is not None:
        sq = _rowdot(r, r) * _rowdot(h, h) + _rowdot(back, back) * _rowdot(k, k)
        cf = clip_factor(sq, spec)
        step = step * cf
    e1, e2 = _rows(step, r), _rows(step, back)
    zr, W2n, S2n, step2 = matrix_step(W2, S2, k, kh, q, e2, c, spec.dgd, ends)
    hr = sigma(zr)
    hh = normalize(h, spec.norm_eps)
    o1, W1n, S1n, step1 = matrix_step(W1, S1, h, hh, hr, e1, c, spec.dgd, ends)
    end = (W1n, W2n, S1n, S2n) if ends else weights
    f = _Chunk(vt, z, h, hh, r, rW1, back, sq, cf, e1, e2, zr, hr, step2, step1)
    return q + o1, end, f  # type: ignore[return-value]


def mlp_chunk_adjoint(
    weights: tuple[Tensor, ...], x: tuple[Tensor, ...], c: _Coef, spec: MemorySpec, f: _Chunk,
    do: Tensor, d_end: tuple[Tensor, ...], dc: dict[str, Tensor],
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:  # fmt: skip
    """The adjoint of `mlp_chunk` from `do` and the chunk-end state's adjoint `d_end = (dW1', dW2', dS1', dS2')`:
    -> the start state's adjoint `(dW1, dW2, dS1, dS2)` and `(dq, dk, dk̂, dv)`; gate adjoints added to `dc`."""
    W1, W2, S1, S2 = weights
    q, k, kh, v = x
    dW1n, dW2n, dS1n, dS2n = d_end
    sigma, dsigma = activation(spec.activation)
    # W1 reads σ(W2's reads): run its adjoint first, then W2's with the chained read adjoint
    dW1, dS1, dH, dHh, dHr, dE1 = matrix_step_adjoint(W1, S1, f.h, f.hh, f.hr, f.e1, c, f.step1, do, dW1n, dS1n, dc)
    nrm = torch.sqrt((f.h * f.h).sum(-1, keepdim=True) + spec.norm_eps**2)
    dH = dH + (dHh - _rows(_rowdot(dHh, f.hh), f.hh)) / nrm  # through h_hat = h / |h|
    dzr = dHr * dsigma(f.zr)
    dW2, dS2, dK, dKh, dq, dE2 = matrix_step_adjoint(W2, S2, k, kh, q, f.e2, c, f.step2, dzr, dW2n, dS2n, dc)
    dq = dq + do  # the residual of Eq. 89
    # the frozen surprise: e1 = -eta cf r, e2 = -eta cf (r W1 ∘ σ'(z)), r = k + σ(z) W1ᵀ - v_t (L2) or -v_t (dot)
    d_step = _rowdot(dE1, f.r) + _rowdot(dE2, f.back)  # the adjoint of -eta cf
    dc["eta"] += -d_step if f.cf is None else -f.cf * d_step
    step = -c.eta if f.cf is None else -c.eta * f.cf
    dback, dr = _rows(step, dE2), _rows(step, dE1)
    if spec.max_grad_norm is not None:  # cf = c / sqrt(max(sq, c²)), sq = |r|² |h|² + |back|² |k|²
        assert f.sq is not None and f.cf is not None
        c2 = spec.max_grad_norm**2
        dsq = torch.where(f.sq > c2, 0.5 * c.eta * d_step * f.cf / f.sq.clamp_min(c2), 0.0)
        dback = dback + _rows(2 * dsq * _rowdot(k, k), f.back)
        dr = dr + _rows(2 * dsq * _rowdot(f.h, f.h), f.r)
        dH = dH + _rows(2 * dsq * _rowdot(f.r, f.r), f.h)
        dK = dK + _rows(2 * dsq * _rowdot(f.back, f.back), k)
    ds = dsigma(f.z)
    drW1 = dback * ds
    dr = dr + drW1 @ W1.mT
    dW1 = dW1 + f.r.mT @ drW1
    dz = dback * f.rW1 * _second_derivative(spec.activation, f.z)
    if spec.objective == "l2":
        dK = dK + dr
        dH = dH + dr @ W1
        dW1 = dW1 + dr.mT @ f.h
    dz = dz + dH * ds
    dK = dK + dz @ W2
    dW2 = dW2 + dz.mT @ k
    dv = -dr
    if spec.self_values:  # v_t = v + W1 σ(W2 v) at the chunk start
        zv = v @ W2.mT
        dW1 = dW1 - dr.mT @ sigma(zv)
        dzv = (-dr @ W1) * dsigma(zv)
        dW2 = dW2 + dzv.mT @ v
        dv = dv + dzv @ W2
    return (dW1, dW2, dS1, dS2), (dq, dK, dKh, dv)


# ---------------------------------------------------------------------------------------------
# the op: forward saves chunk-start states, backward walks the chunks in reverse (custom ops: module docstring)


@torch.library.custom_op("nestlearn::adjoint_memory", mutates_args=())
def adjoint_memory(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor, weights: list[Tensor],
    momenta: list[Tensor], chunk_size: int, kind: str, objective: str, activation: str, expansion: int, dgd: bool,
    momentum: bool, decay: bool, out_norm: bool, self_values: bool, eps: float, clip: float | None, kernel: bool,
    kernel_backward: bool, save_every: int, mixed: bool,
) -> list[Tensor]:  # fmt: skip
    """The forward (`kernel`: as one Triton program per sequence and head; `kernel_backward` is the backward's,
    kept for it; `save_every`: which starts it returns) -> `[o, W1', W2', S1', S2', anchor W1, anchor W2, *saved
    start states]`, the starts in the compute dtype for the backward (`_saved_starts`: every chunk's, `[B, H, N,
    ...]`, or every `save_every`-th, or none, `[B, H, 0, ...]`, where the backward takes the input state)."""
    spec = spec_from_args(kind, objective, activation, expansion, dgd, momentum, decay, out_norm, self_values, eps,
                          clip)  # fmt: skip
    seq = [q, k, v, eta, alpha, beta]
    dt = compute_dtype(*seq, *weights, *momenta)
    with no_autocast(q):  # the gate products and the loops in the compute dtype, as the backward recomputes them
        prep = _prepare([x.to(dt) for x in seq], chunk_size, spec, mixed)._replace(products=None)  # backward's only
        ends = q.shape[1] % chunk_size == 0
        state = tuple(w.to(dt) for w in (*weights, *momenta))
        o, state, starts = (_forward_kernel if kernel else _forward_loop)(prep, state, spec, ends)
    B, T, H, D = q.shape
    o = o.reshape(B, H, -1, D)[:, :, :T].transpose(1, 2).to(q.dtype)
    anchor = tuple(s[:, :, -1] for s in starts[:2]) if not ends else state[:2]
    # the final state is new (the kernel's own buffers or the loop's results, never an input); the anchor may be the
    # final weights, and a custom op's outputs may not alias each other: it is copied
    return [o.contiguous(), *state, *fresh(anchor), *_saved_starts(starts, save_every)]


def saved_count(N: int, save_every: int) -> int:
    """How many chunk-start states a call of N chunks saves: N (`save_every` 1), one per `save_every` chunks
    (the backward recomputes the others, a segment at a time), or none (0, or a one-chunk call: the backward takes
    the input state, which autograd keeps anyway; HOPE's projection memories make one call per chunk)."""
    return 0 if save_every == 0 or N == 1 else -(-N // save_every)


def _saved_starts(starts: tuple[Tensor, ...], save_every: int) -> tuple[Tensor, ...]:
    """The start states the forward saves for the backward (`saved_count`), as fresh tensors."""
    N = starts[0].shape[2]
    if saved_count(N, save_every) == 0:
        return tuple(s.new_empty(*s.shape[:2], 0, *s.shape[3:]) for s in starts)
    return starts if save_every == 1 else tuple(s[:, :, ::save_every].contiguous() for s in starts)


@adjoint_memory.register_fake
def _(q, k, v, eta, alpha, beta, weights, momenta, chunk_size, *args):  # type: ignore[no-untyped-def]
    dt = compute_dtype(q, k, v, eta, alpha, beta, *weights, *momenta)
    saved = saved_count(-(-q.shape[1] // chunk_size), args[-2])  # args: ..., save_every, mixed
    state = [w.new_empty(w.shape, dtype=dt) for w in (*weights, *momenta)]
    starts = [w.new_empty(*w.shape[:2], saved, *w.shape[2:]) for w in state]
    return [q.new_empty(q.shape), *state, *(w.new_empty(w.shape) for w in state[:2]), *starts]


@torch.library.custom_op("nestlearn::adjoint_memory_backward", mutates_args=())
def adjoint_memory_backward(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor, starts: list[Tensor],
    grads_out: list[Tensor], chunk_size: int, kind: str, objective: str, activation: str, expansion: int,
    dgd: bool, momentum: bool, decay: bool, out_norm: bool, self_values: bool, eps: float, clip: float | None,
    kernel: bool, kernel_forward: bool, save_every: int, mixed: bool,
) -> list[Tensor]:  # fmt: skip
    """Gradients of `adjoint_memory` w.r.t. q, k, v, eta, alpha, beta and the initial (W1, W2, S1, S2), in the
    compute dtype, from `grads_out = [do, dW1', dW2', dS1', dS2', d anchor W1, d anchor W2]` (`kernel`: the chunk
    loop as one Triton program per sequence and head, else the PyTorch loop below). `starts`: every chunk's start
    state, or every `save_every`-th (the input state alone for `save_every` 0), whose segments the backward
    recomputes with the forward's own path (`kernel_forward`: the one that made the saved starts;
    `_backward_segments`)."""
    spec = spec_from_args(kind, objective, activation, expansion, dgd, momentum, decay, out_norm, self_values, eps,
                          clip)  # fmt: skip
    seq, dt = [q, k, v, eta, alpha, beta], starts[0].dtype
    with no_autocast(q):
        prep = _prepare([x.to(dt) for x in seq], chunk_size, spec, mixed)
    T = q.shape[1]
    N, n = prep.q.shape[2:4]
    do_c = _vector_chunks(grads_out[0].to(dt), n, N * n - T)
    d_end = tuple(g.to(dt) for g in grads_out[1:5])
    d_anchor = tuple(g.to(dt) for g in grads_out[5:7])
    ends = T % chunk_size == 0
    if ends:  # the anchor is the final weights
        d_end = (d_end[0] + d_anchor[0], d_end[1] + d_anchor[1], *d_end[2:])
    with no_autocast(q):
        grads, d_start = _backward_segments(prep, tuple(starts), save_every, do_c, d_end,
                                            None if ends else d_anchor, spec, kernel, kernel_forward)  # fmt: skip
    with no_autocast(q):
        grads = _prepare_adjoint(prep, T, spec, grads)
    # contiguous, as the fake implementation says: a gradient takes its input's strides (HOPE's generated eta is a
    # transposed view), and a compiled backward that trusted the fake strides viewed it as contiguous
    return [g.contiguous() for g in (*grads, *d_start)]


@adjoint_memory_backward.register_fake
def _(q, k, v, eta, alpha, beta, starts, grads_out, *args):  # type: ignore[no-untyped-def]
    dt = starts[0].dtype
    return [x.new_empty(x.shape, dtype=dt) for x in (q, k, v, eta, alpha, beta)] + [
        s.new_empty(*s.shape[:2], *s.shape[3:]) for s in starts
    ]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    q, k, v, eta, alpha, beta, weights, momenta, chunk_size, *spec, kernel, kernel_backward, save_every, mixed = inputs
    no_starts = output[7].shape[2] == 0  # the first start is the input state (`saved_count`)
    ctx.save_for_backward(q, k, v, eta, alpha, beta, *(output[7:] if not no_starts else (*weights, *momenta)))
    ctx.args, ctx.no_starts = (chunk_size, *spec, kernel_backward, kernel, save_every, mixed), no_starts
    ctx.dtypes = [x.dtype for x in (q, k, v, eta, alpha, beta, *weights, *momenta)]
    ctx.compute_dtype = output[7].dtype


def _backward(ctx: Any, grads_out: list[Tensor | None]) -> tuple[Any, ...]:
    q, k, v, eta, alpha, beta, *starts = ctx.saved_tensors
    if ctx.no_starts:
        starts = [w.to(ctx.compute_dtype)[:, :, None] for w in starts]
    like = [q, *(s[:, :, 0] for s in starts), *(s[:, :, 0] for s in starts[:2])]
    filled = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads_out[:7], like, strict=True)]
    got = adjoint_memory_backward(q, k, v, eta, alpha, beta, starts, filled, *ctx.args)
    got = [g.to(t) for g, t in zip(got, ctx.dtypes, strict=True)]
    return (*got[:6], got[6:8], got[8:10], *([None] * 16))


adjoint_memory.register_autograd(_backward, setup_context=_setup_context)


def _backward_segments(
    prep: _Prepared, starts: tuple[Tensor, ...], save_every: int, do_c: Tensor, d_end: tuple[Tensor, ...],
    d_anchor: tuple[Tensor, ...] | None, spec: MemorySpec, kernel: bool, kernel_forward: bool,
) -> tuple[list[Tensor], tuple[Tensor, ...]]:  # fmt: skip
    """The backward's chunk loop (`_backward_kernel` or `_backward_loop`: `kernel`) from every chunk's saved start,
    or, with sparse starts (`saved_count`), segment by segment from the last: each segment's chunk starts
    recomputed by the path that made the saved ones (`_forward_kernel` or `_forward_loop`: `kernel_forward`) from
    its saved start, then its chunks walked back with the state's adjoint carried to the segment before. The
    recompute repeats the forward's arithmetic on the same inputs, so the gradients equal the dense ones exactly;
    it costs one more forward pass over the chunks and holds one segment's starts at a time."""
    run = _backward_kernel if kernel else _backward_loop
    forward = _forward_kernel if kernel_forward else _forward_loop
    N = prep.q.shape[2]
    if starts[0].shape[2] == N:
        return run(prep, starts, do_c, d_end, d_anchor, spec)
    K = save_every if save_every > 0 else N
    parts = []
    for s in reversed(range(starts[0].shape[2])):
        lo, hi = s * K, min(s * K + K, N)
        seg = _Prepared(*(t[:, :, lo:hi] for t in (prep.q, prep.k, prep.kh, prep.v)),
                        _Coef(*(f[:, :, lo:hi] for f in prep.coef)), prep.mixed)  # fmt: skip
        first = tuple(w[:, :, s] for w in starts)
        with torch.no_grad():
            seg_starts = forward(seg, first, spec, True)[2] if hi - lo > 1 else tuple(w[:, :, None] for w in first)
        grads, d_end = run(seg, seg_starts, do_c[:, :, lo:hi], d_end, d_anchor if hi == N else None, spec)
        parts.append(grads)
    return [torch.cat(g[::-1], dim=2) for g in zip(*parts, strict=True)], d_end


def _backward_loop(
    prep: _Prepared, starts: tuple[Tensor, ...], do_c: Tensor, d_end: tuple[Tensor, ...],
    d_anchor: tuple[Tensor, ...] | None, spec: MemorySpec,
) -> tuple[list[Tensor], tuple[Tensor, ...]]:  # fmt: skip
    """The backward's chunk loop in PyTorch, from the last chunk to the first (`_backward_kernel`'s contract): ->
    the adjoints of `prep.flat()` and the initial state's adjoint."""
    grads = [torch.zeros_like(t) for t in prep.flat()]
    names = _Coef._fields
    N = prep.q.shape[2]
    with torch.no_grad():
        for j in reversed(range(N)):
            weights = tuple(s[:, :, j] for s in starts)
            x = tuple(t[:, :, j] for t in (prep.q, prep.k, prep.kh, prep.v))
            c = _chunk_coef(prep.coef, j)
            _, _, fwd = mlp_chunk(weights, x, c, spec, ends=False)
            dc = {name: torch.zeros_like(getattr(c, name)) for name in names}
            d_end, dx = mlp_chunk_adjoint(weights, x, c, spec, fwd, do_c[:, :, j], d_end, dc)
            if j == N - 1 and d_anchor is not None:  # the anchor: the last (open) chunk's start weights
                d_end = (d_end[0] + d_anchor[0], d_end[1] + d_anchor[1], *d_end[2:])
            for i, g in enumerate(dx):
                grads[i][:, :, j] = g
            for i, name in enumerate(names):
                grads[4 + i][:, :, j] = dc[name]
    return grads, d_end


def _forward_loop(
    prep: _Prepared, weights: tuple[Tensor, ...], spec: MemorySpec, ends: bool
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The chunk loop in PyTorch: -> outputs `[B, H, N, n, D]`, the final state, every chunk's start state
    (stacked on dim 2)."""
    x_all = (prep.q, prep.k, prep.kh, prep.v)
    N = prep.q.shape[2]
    starts, outs = [], []
    for j in range(N):
        starts.append(weights)
        o, weights, _ = mlp_chunk(weights, tuple(x[:, :, j] for x in x_all), _chunk_coef(prep.coef, j), spec)
        outs.append(o)
        if j < N - 1 or ends:
            weights = tuple(flush_subnormals(list(weights)))
    return torch.stack(outs, dim=2), weights, tuple(torch.stack(s, dim=2) for s in zip(*starts, strict=True))


# The kernel variants this process's GPU could not launch (more shared memory than it has: which variants fit
# depends on the card, the dots' precision and the head shape, e.g. d = 64, E = 128 at 64-token chunks needs 320
# KiB with tf32x3 and 224 with tf32 against Hopper's 227; docs/results/kernel_resources_sm90.md): those calls run
# the PyTorch loops, with one warning per variant.
_UNLAUNCHABLE: set[tuple[Any, ...]] = set()


def _launch_key(direction: str, prep: _Prepared, E: int, spec: MemorySpec) -> tuple[Any, ...]:
    from ._mlp_kernels import products

    n, D = prep.q.shape[-2:]
    return direction, str(prep.q.device), n, D, E, spec, products(prep.q.device, prep.mixed)


def _launched(key: tuple[Any, ...], launch: Any) -> bool:
    """Run `launch()` unless `key`'s variant failed to launch before; False (with a warning the first time) where
    the GPU lacks a resource the compiled kernel needs (Triton checks its shared memory at the first launch,
    before any work is done)."""
    from triton.runtime.errors import OutOfResources

    if key in _UNLAUNCHABLE:
        return False
    try:
        launch()
    except OutOfResources as err:
        _UNLAUNCHABLE.add(key)
        direction, _, n, D, E, _, precision = key
        warnings.warn(f"the MLP memory's {direction} kernel does not fit this GPU at {n}-token chunks, head dim "
                      f"{D}, hidden {E}, {precision} dots ({err}); those calls run the PyTorch loop (slower). "
                      "Shorter chunks (mem_chunk) or bf16 autocast (one-pass tf32 dots) need less shared memory",
                      stacklevel=2)  # fmt: skip
        return False
    return True


def _backward_kernel(
    prep: _Prepared, starts: tuple[Tensor, ...], do_c: Tensor, d_end: tuple[Tensor, ...],
    d_anchor: tuple[Tensor, ...] | None, spec: MemorySpec,
) -> tuple[list[Tensor], tuple[Tensor, ...]]:  # fmt: skip
    """The backward's chunk loop as one Triton program per sequence and head (`_mlp_kernels.py`): -> the adjoints
    of `prep.flat()` and the initial state's adjoint (`_backward_loop`'s where the GPU cannot launch it)."""
    from ._mlp_kernels import launch_mlp_backward

    def unwritten(t: Tensor) -> Tensor:
        return torch.empty(t.shape, device=t.device, dtype=t.dtype)  # every entry is written by the kernel

    x = [t.detach().contiguous() for t in (prep.q, prep.k, prep.kh, prep.v)]
    coef = [f.detach().contiguous() for f in prep.coef]
    d_state = [g.detach().contiguous().clone() for g in d_end]
    anchor = [a.detach().contiguous() for a in d_anchor] if d_anchor is not None else None
    dx, dcoef = [unwritten(t) for t in x], [unwritten(f) for f in coef]
    launch = functools.partial(
        launch_mlp_backward, x, coef, [s.contiguous() for s in starts], do_c.contiguous(), d_state, anchor, dx, dcoef,
        eps=spec.norm_eps, dgd=spec.dgd, self_values=spec.self_values, l2=spec.objective == "l2",
        act=spec.activation, clip=spec.max_grad_norm, mixed=prep.mixed,
    )  # fmt: skip
    if not _launched(_launch_key("backward", prep, d_end[0].shape[-1], spec), launch):
        return _backward_loop(prep, starts, do_c, d_end, d_anchor, spec)
    return dx + dcoef, tuple(d_state)


def _forward_kernel(
    prep: _Prepared, weights: tuple[Tensor, ...], spec: MemorySpec, ends: bool
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """`_forward_loop` as one Triton program per sequence and head (`_mlp_kernels.py`; the loop itself where the
    GPU cannot launch it)."""
    from ._mlp_kernels import launch_mlp_forward

    B, H, N = prep.q.shape[:3]
    state = [w.detach().contiguous().clone() for w in weights]
    starts = [torch.empty(B, H, N, *w.shape[-2:], device=w.device, dtype=w.dtype) for w in state]
    out = torch.empty(prep.q.shape, device=prep.q.device, dtype=prep.q.dtype)  # contiguous, as the kernel writes
    x = [t.detach().contiguous() for t in (prep.q, prep.k, prep.kh, prep.v)]
    coef = [f.detach().contiguous() for f in prep.coef]
    launch = functools.partial(
        launch_mlp_forward, x, coef, state, starts, out, eps=spec.norm_eps, dgd=spec.dgd,
        self_values=spec.self_values, l2=spec.objective == "l2", act=spec.activation, clip=spec.max_grad_norm,
        mixed=prep.mixed,
    )  # fmt: skip
    if not _launched(_launch_key("forward", prep, state[0].shape[-1], spec), launch):
        return _forward_loop(prep, weights, spec, ends)
    return out, tuple(state), tuple(starts)
