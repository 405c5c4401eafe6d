"""The GPU path of the memory op and the default dispatch (`impl="fused"` and `impl="auto"` of the layers).

What this is: `memory_fused(q, k, v, eta, alpha, beta, *, state, spec, chunk_size)`, the same function as
`memory_chunk` (same signature, same semantics), computed for the linear memory `M(x) = W x` by `affine.py`: every
chunk's algebra batched over all chunks, and the only sequential step, the scan over chunk-boundary states, as one
Triton launch forward and one backward (`scan.py`, `_scan_kernels.py`). `memory_auto` takes it where it applies
on CUDA and the chunk form everywhere else. `supports(...)` says where it applies: Triton installed and CUDA (or
Triton's interpreter on CPU tensors, the tests' way), float32 states, the linear memory without the gradient clip,
a call that starts at a chunk boundary.
For the MLP memory (whose errors are not affine in the weights, so its chunks stay sequential) `memory_fused` is
`memory_adjoint(kernel=True)`: the chunk loop forward and backward as one Triton program per sequence and head
each (`_mlp_kernels.py`), where the state fits on chip and the chunk is a power of two from 16 tokens to what
each direction's kernel holds (`adjoint.kernel_supports`: 64 tokens, with heads of 32 and hidden widths of 64
or more over 32 tokens; otherwise the same function
through `adjoint.py`'s PyTorch loops). `memory_auto` takes it on CUDA from every chunk boundary: forward +
backward 6.4x the chunk form at C = 64 and 32x at C = 16 on the H200 with the kernels, at a third of its memory
(docs/results/memory_op.md). Each kernel variant (switches, chunk length, head shape) compiles once per
machine, minutes for a backward (`_mlp_kernels.products`).
What it is not: the branch LayerNorm, the linear memory's gradient clip (the MLP memory's is in its kernels), or a
call that finishes a chunk an earlier call opened.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import adjoint, affine
from .chunk import memory_chunk
from .common import MemorySpec, MemoryState, check_inputs, triton_available


def supports(spec: MemorySpec, state: MemoryState, q: Tensor, interpret: bool = False) -> bool:
    """Whether `memory_fused` computes this call (otherwise `memory_chunk` does); `interpret` as
    `common.triton_available`. float64 calls (the reference precision) stay with the chunk form: the kernel
    computes in float32 (D8)."""
    return (
        triton_available(q.device, interpret)
        and q.dtype != torch.float64
        and all(t.dtype == torch.float32 for t in (*state.weights, *state.momenta))
        and affine.supports(spec, state)
    )


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
    save_every: int = 1,
) -> tuple[Tensor, MemoryState]:
    """`memory_chunk` through the GPU path (see `supports`, and the module docstring for the MLP memory); arguments
    and results as `memory_naive`; `save_every` as `memory_adjoint`'s (the MLP memory's chunk starts kept for the
    backward; the linear memory's scan ignores it)."""
    check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    if spec.kind == "mlp" and adjoint.supports(spec, state) and triton_available(q.device, interpret=True):
        return adjoint.memory_adjoint(q, k, v, eta, alpha, beta, state=state, spec=spec, chunk_size=chunk_size,
                                      kernel=True, save_every=save_every)  # fmt: skip
    if not supports(spec, state, q, interpret=True):
        raise ValueError(
            "memory_fused covers the MLP memory without the branch LayerNorm and the linear memory without the "
            "gradient clip, float32 states, calls that start at a chunk boundary, on CUDA (or TRITON_INTERPRET=1); "
            "use memory_auto, which falls back to memory_chunk"
        )
    return affine.memory_affine(q, k, v, eta, alpha, beta, state=state, spec=spec, chunk_size=chunk_size,
                                kernel=True)  # fmt: skip


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
    save_every: int = 1,
) -> tuple[Tensor, MemoryState]:
    """The GPU path where it applies on CUDA, else `memory_chunk` (the layers' default, `impl="auto"`): the linear
    memory's scan where `supports` says; the MLP memory's written-out backward from a chunk boundary
    (`adjoint.supports`), with its kernels in each direction where `adjoint.kernel_supports` takes the call and its
    PyTorch loops elsewhere (the loops: 0.95x the chunk form's speed at a third of its memory, H200), keeping the
    chunk starts `save_every` says (`memory_adjoint`; the other paths ignore it)."""
    if spec.kind == "mlp" and q.device.type == "cuda" and adjoint.supports(spec, state):
        return adjoint.memory_adjoint(q, k, v, eta, alpha, beta, state=state, spec=spec, chunk_size=chunk_size,
                                      check_gates=check_gates, kernel=True, save_every=save_every)  # fmt: skip
    op = memory_fused if spec.kind != "mlp" and supports(spec, state, q) else memory_chunk
    return op(q, k, v, eta, alpha, beta, state=state, spec=spec, chunk_size=chunk_size, check_gates=check_gates)
