"""Memory-lean training path of any memory: the chunk form without keeping its intermediates for the backward.

What this is: `memory_lean(q, k, v, eta, alpha, beta, *, state, spec, chunk_size)`, the same function as
`memory_chunk` (same signature and results) whose autograd keeps only the state at the start of every group of
chunks (`group_tokens` tokens, whole chunks) instead of every intermediate of every chunk. The backward walks the
groups from the last to the first and re-runs each one by `memory_chunk` under autograd from its saved start state,
handing the start state's gradient to the group before. Activation memory: the saved states (`T / group` of them)
plus one group's intermediates, at the price of one more forward pass. Both directions are `torch.library` custom
ops with fake implementations, so `torch.compile`, activation checkpointing and FSDP2 see single opaque ops.
Covers every spec of `memory_chunk`; a call must start at a chunk boundary (`state.offset == 0`).
What it is not: a faster op (its forward is `memory_chunk`'s); the GPU path is `fused.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .chunk import memory_chunk
from .common import (
    MemorySpec,
    MemoryState,
    autograd_inside_op,
    check_inputs,
    fresh,
    no_autocast,
    spec_args,
    spec_from_args,
)

GROUP_TOKENS = 1024  # tokens (whole chunks) between saved states


def memory_lean(
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
    """`memory_chunk` with a memory-lean backward (module docstring); arguments and results as `memory_naive`."""
    check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    if state.offset != 0:
        raise ValueError("memory_lean starts at a chunk boundary (state.offset == 0); memory_chunk finishes a chunk")
    n = len(state.weights)
    group = max(1, GROUP_TOKENS // chunk_size) * chunk_size
    save = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, eta, alpha, beta, *state.weights, *state.momenta)
    )
    outs = lean_memory(q, k, v, eta, alpha, beta, list(state.weights), list(state.momenta), chunk_size, group,
                       *spec_args(spec), save)  # fmt: skip
    o, weights, momenta, anchor = outs[0], outs[1 : 1 + n], outs[1 + n : 1 + 2 * n], outs[1 + 2 * n : 1 + 3 * n]
    return o, MemoryState(tuple(weights), tuple(momenta), tuple(anchor), q.shape[1] % chunk_size)


@torch.library.custom_op("nestlearn::lean_memory", mutates_args=())
def lean_memory(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None, beta: Tensor | None,
    weights: list[Tensor], momenta: list[Tensor], chunk_size: int, group: int,
    kind: str, objective: str, activation: str, expansion: int, dgd: bool, momentum: bool, decay: bool,
    out_norm: bool, self_values: bool, eps: float, clip: float | None, save: bool,
) -> list[Tensor]:  # fmt: skip
    """-> `[o, *final weights, *final momenta, *anchor, *saved weights, *saved momenta]`; saved states are
    `[B, H, G, o, i]`, one per group start (empty `[0]` tensors when not `save`)."""
    spec = spec_from_args(kind, objective, activation, expansion, dgd, momentum, decay, out_norm, self_values, eps,
                          clip)  # fmt: skip
    T, n = q.shape[1], len(weights)
    st = MemoryState(tuple(weights), tuple(momenta))
    starts: list[MemoryState] = []
    outs = []
    for lo in range(0, T, group):
        starts.append(st)
        piece = [x[:, lo : lo + group] if x is not None else None for x in (q, k, v, eta, alpha, beta)]
        with no_autocast(q):  # as the backward recomputes it
            o, st = memory_chunk(*piece, state=st, spec=spec, chunk_size=chunk_size)
        outs.append(o)
    if save:
        saved = [torch.stack([s.weights[i] for s in starts], dim=2) for i in range(n)]
        saved += [torch.stack([s.momenta[i] for s in starts], dim=2) for i in range(n)]
    else:
        saved = [q.new_empty(0) for _ in range(2 * n)]
    return [torch.cat(outs, dim=1), *fresh(st.weights), *fresh(st.momenta), *fresh(st.anchor), *saved]


@lean_memory.register_fake
def _(q, k, v, eta, alpha, beta, weights, momenta, chunk_size, group, *args):  # type: ignore[no-untyped-def]
    save = args[-1]
    G = -(-q.shape[1] // group)
    states = [w.new_empty(*w.shape[:2], G, *w.shape[2:]) if save else q.new_empty(0) for w in (*weights, *momenta)]
    return [q.new_empty(q.shape), *(w.new_empty(w.shape) for w in (*weights, *momenta, *weights)), *states]


@torch.library.custom_op("nestlearn::lean_memory_backward", mutates_args=())
def lean_memory_backward(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor | None, beta: Tensor | None,
    saved: list[Tensor], grads_out: list[Tensor], chunk_size: int, group: int,
    kind: str, objective: str, activation: str, expansion: int, dgd: bool, momentum: bool, decay: bool,
    out_norm: bool, self_values: bool, eps: float, clip: float | None,
) -> list[Tensor]:  # fmt: skip
    """Gradients of `lean_memory` w.r.t. q, k, v, eta, alpha, beta (zeros for an absent gate), every initial weight
    and momentum, from `grads_out = [do, *dW_final, *dS_final, *d_anchor]`: group by group from the last, each
    re-run by `memory_chunk` under autograd from its saved start state."""
    spec = spec_from_args(kind, objective, activation, expansion, dgd, momentum, decay, out_norm, self_values, eps,
                          clip)  # fmt: skip
    T, n = q.shape[1], len(saved) // 2
    do, d_end = grads_out[0], list(grads_out[1 : 1 + 2 * n])
    d_anchor = grads_out[1 + 2 * n :]
    if T % chunk_size == 0:  # no open chunk: the anchor is the final weights
        d_end[:n] = [a + b for a, b in zip(d_end[:n], d_anchor, strict=True)]
    seq = (q, k, v, eta, alpha, beta)
    grads = [torch.zeros_like(x) if x is not None else q.new_zeros(0) for x in seq]
    starts = list(range(0, T, group))
    for g in reversed(range(len(starts))):
        lo, hi = starts[g], min(starts[g] + group, T)
        with autograd_inside_op(), torch.enable_grad(), no_autocast(q):
            piece = [x[:, lo:hi].detach().requires_grad_() if x is not None else None for x in seq]
            state = [s[:, :, g].detach().requires_grad_() for s in saved]
            o, new = memory_chunk(*piece, state=MemoryState(tuple(state[:n]), tuple(state[n:])), spec=spec,
                                  chunk_size=chunk_size)  # fmt: skip
            outs, gouts = [o, *new.weights, *new.momenta], [do[:, lo:hi], *d_end]
            if g == len(starts) - 1 and T % chunk_size:  # the anchor: the last (open) chunk's start weights
                outs, gouts = outs + list(new.anchor), gouts + list(d_anchor)
            inputs = [x for x in piece if x is not None] + state
            got = list(torch.autograd.grad(outs, inputs, gouts, allow_unused=True))
        got = [g_ if g_ is not None else torch.zeros_like(x) for g_, x in zip(got, inputs, strict=True)]
        it = iter(got)
        for x, g_all in zip(piece, grads, strict=True):
            if x is not None:
                g_all[:, lo:hi] = next(it)
        d_end = [next(it) for _ in range(2 * n)]
    return [*grads, *d_end]


@lean_memory_backward.register_fake
def _(q, k, v, eta, alpha, beta, saved, grads_out, *args):  # type: ignore[no-untyped-def]
    n = len(saved) // 2
    grads = [x.new_empty(x.shape) if x is not None else q.new_empty(0) for x in (q, k, v, eta, alpha, beta)]
    return [*grads, *(s.new_empty(*s.shape[:2], *s.shape[3:]) for s in saved[: 2 * n])]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    q, k, v, eta, alpha, beta, weights, _momenta, chunk_size, group, *spec_args, save = inputs
    if not save:
        raise RuntimeError("lean_memory ran with save=False but a gradient is needed; call it with save=True")
    n = len(weights)
    ctx.save_for_backward(q, k, v, eta, alpha, beta, *output[1 + 3 * n :])
    ctx.args = (chunk_size, group, *spec_args)
    ctx.n, ctx.gates = n, (alpha is not None, beta is not None)


def _backward(ctx: Any, grads_out: list[Tensor | None]) -> tuple[Any, ...]:
    q, k, v, eta, alpha, beta, *saved = ctx.saved_tensors
    n = ctx.n
    outs_like = [q, *(s[:, :, 0] for s in saved), *(s[:, :, 0] for s in saved[:n])]
    wanted = zip(grads_out[: 1 + 3 * n], outs_like, strict=True)
    filled = [g if g is not None else torch.zeros_like(x) for g, x in wanted]
    got = lean_memory_backward(q, k, v, eta, alpha, beta, saved, filled, *ctx.args)
    seq = [got[i] if present else None for i, present in enumerate((True, True, True, True, *ctx.gates))]
    return (*seq, got[6 : 6 + n], got[6 + n : 6 + 2 * n], *([None] * 14))


lean_memory.register_autograd(_backward, setup_context=_setup_context)
