"""Fused Triton kernel of the linear memory's chunk recurrence: one launch per call, the chunk loop inside.

What this is: `memory_fused(q, k, v, eta, alpha, beta, *, state, spec, chunk_size)`, the same function as
`memory_chunk` (same signature, same semantics: D5's chunk-start gradients and inclusive reads, DGD, momentum,
decay) for the linear memory `M(x) = W x` (D2), computed by one Triton program per (sequence, head, block of
`BV` output rows of W) that keeps its rows of `W` and `S` on chip and walks the chunks in order. Within a chunk it
forms the chunk's gate products (cumulative products, no division: gates of exactly 0 are fine), the frozen
errors `E = -eta (K W^T - V)` (Eq. 93), the grams, solves the unit-triangular DGD system row by row and writes the
reads and the chunk-end state (the equations of `chunk.py`'s `_matrix_chunk`). The rows of W are independent
given the keys and gates, which is what lets `BV` split them over programs.
The backward pass recomputes: the forward saves only the start state `(W, S)` of every group of chunks
(`RECOMPUTE_TOKENS` tokens), and the backward is the memory-lean one of `lean.py`: each group re-run by the PyTorch
chunk form under autograd from its saved state, from the last to the first. Activation memory is one state per
group plus one group's intermediates.
`impl="auto"` takes this path only for chunks of at most `AUTO_MAX_CHUNK` tokens, where it measured faster.
`supports(...)` says when this path applies (CUDA or the Triton interpreter; linear memory; no self-generated
values, gradient clip or branch norm; a call that starts at a chunk boundary); `memory_chunk` covers the rest.
The kernels themselves are in `_triton_kernels.py`, imported when one is launched.
What it is not: the MLP memory's kernel or a fused backward kernel (the recompute runs the PyTorch chunk form).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

from .chunk import memory_chunk
from .common import MemorySpec, MemoryState, check_inputs
from .lean import lean_memory_backward

# Triton is optional: CPU machines without it use the PyTorch chunk form. It is imported only when a kernel runs.
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def available(device: torch.device, interpret: bool = False) -> bool:
    """Whether the kernel can run on `device`: Triton installed, and CUDA, or with `interpret` Triton's interpreter
    on CPU tensors (`TRITON_INTERPRET=1` set before Triton compiles the kernel: the tests' way)."""
    if not HAVE_TRITON:
        return False
    return device.type == "cuda" or (interpret and os.environ.get("TRITON_INTERPRET") == "1")


def supports(spec: MemorySpec, state: MemoryState, q: Tensor, interpret: bool = False) -> bool:
    """Whether the fused kernel computes this call (otherwise `memory_chunk` does); `interpret` as `available`.
    float64 calls (the reference precision) stay with the chunk form: the kernel computes in float32 (D8)."""
    head_dim = q.shape[-1]
    return (
        available(q.device, interpret)
        and q.dtype != torch.float64
        and all(t.dtype == torch.float32 for t in (*state.weights, *state.momenta))
        and spec.kind == "linear"
        and not spec.self_values
        and spec.max_grad_norm is None
        and not spec.out_norm
        and state.offset == 0
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
    )


def _block_rows(D: int) -> int:
    """Output rows of W per program: small enough to spread a head over several programs."""
    return min(D, 32)


def linear_forward(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor,
    w0: Tensor, s0: Tensor, spec: MemorySpec, chunk_size: int, group: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """The kernel launch. q, k, v `[B, T, H, D]`; gates `[B, T, H]`; w0, s0 `[B, H, D, D]` float32.
    -> reads `[B, T, H, D]` (float32), final W, S, W at the last chunk's start, and with `group > 0` the start W,
    S of every `group`-th chunk `[B, H, ceil(N / group), D, D]` (the backward's recompute points)."""
    from ._triton_kernels import _linear_fwd_kernel, _system_inverse_kernel, next_power_of_2

    B, T, H, D = q.shape
    N = -(-T // chunk_size)
    BC = max(16, next_power_of_2(chunk_size))
    BV = _block_rows(D)
    q, k, v = (x.contiguous() for x in (q, k, v))
    eta, alpha, beta = (g.contiguous() for g in (eta, alpha, beta))
    w0, s0 = w0.float().contiguous(), s0.float().contiguous()
    o = torch.empty(B, T, H, D, device=q.device, dtype=torch.float32)
    wf, sf, wa = torch.empty_like(w0), torch.empty_like(s0), torch.empty_like(w0)
    save = group > 0
    NS = -(-N // group) if save else 0
    ws = torch.empty(B, H, NS, D, D, device=q.device, dtype=torch.float32) if save else wf
    ss = torch.empty(B, H, NS, D, D, device=q.device, dtype=torch.float32) if save else sf
    strides = (q.stride(0), q.stride(1), q.stride(2), eta.stride(0), eta.stride(1), eta.stride(2))
    tinv = torch.empty(B, H, N, BC, BC, device=q.device, dtype=torch.float32) if spec.dgd else wf
    if spec.dgd:
        _system_inverse_kernel[(N, B * H)](k, eta, alpha, tinv, T, H, N, spec.norm_eps, *strides, C=chunk_size, BC=BC,
                                           D=D)  # fmt: skip
    grid = (D // BV, B * H)
    _linear_fwd_kernel[grid](
        q, k, v, eta, alpha, beta, w0, s0, o, ws, ss, wf, sf, wa, tinv,
        T, H, N, NS, max(group, 1), spec.norm_eps, *strides,
        C=chunk_size, BC=BC, D=D, BV=BV, DGD=spec.dgd, L2=spec.objective == "l2", SAVE=save,
        num_stages=1 if D >= 128 else 3,  # d = 128 at C = 64 needs 240 KB of shared memory with 3 stages (H200: 227)
    )  # fmt: skip
    return o, wf, sf, wa, (ws if save else None), (ss if save else None)


def memory_fused(
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
    """`memory_chunk` through the fused kernel (see `supports`); arguments and results as `memory_naive`."""
    alpha, beta = check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    if not supports(spec, state, q, interpret=True):
        raise ValueError(
            "memory_fused covers the linear memory without self-generated values, clip or branch norm, a power-of-2 "
            "head dim >= 16, calls that start at a chunk boundary, on CUDA (or TRITON_INTERPRET=1); use "
            "memory_auto, which falls back to memory_chunk"
        )
    return _apply(q, k, v, eta, alpha, beta, state, spec, chunk_size)


def memory_auto(
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
    """The fused kernel where it applies on CUDA and is the faster path (chunks of at most `AUTO_MAX_CHUNK` tokens),
    else `memory_chunk` (the layers' default, `impl="auto"`)."""
    if chunk_size > AUTO_MAX_CHUNK or not supports(spec, state, q):
        return memory_chunk(q, k, v, eta, alpha, beta, state=state, spec=spec, chunk_size=chunk_size,
                            check_gates=check_gates)  # fmt: skip
    alpha, beta = check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    return _apply(q, k, v, eta, alpha, beta, state, spec, chunk_size)


# Measured on the H200 (B = 4, T = 4,096, H = 8, d = 64; docs/results/memory_op.md): at C = 16 the kernel's forward
# is 2.6x the chunk form's and forward + backward 1.3x with 36 % less memory; at C = 64 its forward is 6x slower.
AUTO_MAX_CHUNK = 16


def _apply(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor,
    state: MemoryState, spec: MemorySpec, chunk_size: int,
) -> tuple[Tensor, MemoryState]:  # fmt: skip
    w0, s0 = state.weights[0], state.momenta[0]
    inputs = (q, k, v, eta, alpha, beta, w0, s0)
    save = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    group = max(1, RECOMPUTE_TOKENS // chunk_size) if save else 0
    o, wf, sf, wa, _, _ = linear_memory(*inputs, chunk_size, spec.dgd, spec.objective == "l2", spec.norm_eps, group)
    offset = q.shape[1] % chunk_size  # a call that ends inside a chunk leaves it open for the next one (D5, D12)
    return o.to(q.dtype), MemoryState((wf,), (sf,), (wa,), offset)


# ---------------------------------------------------------------------------------------------
# the op as torch.library custom ops (opaque to torch.compile, activation checkpointing and FSDP2)


@torch.library.custom_op("nestlearn::linear_memory", mutates_args=())
def linear_memory(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor, w0: Tensor, s0: Tensor,
    chunk_size: int, dgd: bool, l2: bool, eps: float, group: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """-> reads `[B, T, H, D]`, final W and S `[B, H, D, D]` (float32), the anchor (W at the last chunk's start when
    the call ends inside a chunk, else the final W: `MemoryState.anchor`), and with `group > 0` the start W and S of
    every `group`-th chunk `[B, H, G, D, D]` (empty otherwise), which the backward re-runs from
    (`lean.lean_memory_backward`). Gates are all given (alpha = 1, beta = 0 when switched off)."""
    spec = MemorySpec(kind="linear", dgd=dgd, objective="l2" if l2 else "dot", norm_eps=eps)
    o, wf, sf, wa, ws, ss = linear_forward(q, k, v, eta, alpha, beta, w0, s0, spec, chunk_size, group)
    if q.shape[1] % chunk_size == 0:
        wa = wf.clone()  # no open chunk: the anchor is the final W (outputs may not alias each other)
    empty = q.new_empty(0, dtype=torch.float32)
    return o, wf, sf, wa, ws if ws is not None else empty, ss if ss is not None else empty.clone()


@linear_memory.register_fake
def _(q, k, v, eta, alpha, beta, w0, s0, chunk_size, dgd, l2, eps, group):  # type: ignore[no-untyped-def]
    B, T, H, D = q.shape
    N = -(-T // chunk_size)
    state = (B, H, -(-N // group), D, D) if group > 0 else (0,)
    f32 = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty(q.shape, **f32), w0.new_empty(w0.shape, **f32), s0.new_empty(s0.shape, **f32),
            w0.new_empty(w0.shape, **f32), q.new_empty(state, **f32), q.new_empty(state, **f32))  # fmt: skip


RECOMPUTE_TOKENS = 1024  # the backward re-runs this many tokens (whole chunks) per autograd call


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    q, k, v, eta, alpha, beta, w0, s0, chunk_size, dgd, l2, eps, group = inputs
    if group < 1:
        raise RuntimeError("linear_memory ran with group=0 (nothing saved) but a gradient is needed; pass group > 0")
    ctx.save_for_backward(q, k, v, eta, alpha, beta, output[4], output[5])
    ctx.args = (chunk_size, group, dgd, l2, eps)
    ctx.dtypes = [x.dtype for x in (q, k, v, eta, alpha, beta, w0, s0)]


def _backward(
    ctx: Any, do: Tensor, dwf: Tensor, dsf: Tensor, dwa: Tensor, _dws: Tensor, _dss: Tensor
) -> tuple[Any, ...]:
    """The memory-lean backward of `lean.py`, from the saved start states of every `group`-th chunk."""
    q, k, v, eta, alpha, beta, ws, ss = ctx.saved_tensors
    C, group, dgd, l2, eps = ctx.args
    zeros = torch.zeros(ws[:, :, 0].shape, dtype=torch.float32, device=ws.device)
    do = do.float() if do is not None else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    grads_out = [do, *(g.float() if g is not None else zeros for g in (dwf, dsf, dwa))]
    seq = [x.float() for x in (q, k, v, eta, alpha, beta)]
    spec = ("linear", "l2" if l2 else "dot", "silu", 1, dgd, True, True, False, False, eps, None)  # lean._spec_args
    grads = lean_memory_backward(*seq, [ws, ss], grads_out, C, group * C, *spec)
    return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), None, None, None, None, None)


linear_memory.register_autograd(_backward, setup_context=_setup_context)
