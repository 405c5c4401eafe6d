"""Per-token reference of the deep-memory op: the recurrence of D4 with the chunk semantics of D5.

What this is: the specification. One Python step per token, written as the paper's equations, exact in
float64, differentiable end to end. `chunk.py` must reproduce it for every chunk size.
What it is not: fast. Use `memory_chunk` for training and inference.

For each weight matrix `W` of the memory, with layer input `x_t` and its normalised `x̂_t`:

    G_t = dl/dW at the chunk-start state                       (Eq. 91: gradient frozen per chunk)
    S_t = beta_t S_{t-1} - eta_t G_t                           (momentum, D4; beta = 0 gives Eq. 88)
    W_t = W_{t-1} (alpha_t I - eta_t x̂_t x̂_t^T) + S_t          (DGD with decay, Eqs. 57 / 88)
    W_t = alpha_t W_{t-1} + S_t                                (plain GD, Titans Eqs. 13-14, when dgd=False)
    o_t = M_t(q_t)                                              (inclusive read, D5)

The layer inputs `x_t` (the key for `W2` or `W`, the hidden activation for `W1`) are also taken at the
chunk-start state, so the same `x_t` enters the gradient and the projector. With chunk_size = 1 this is the
exact per-token recurrence. A state ending inside a chunk carries that chunk's start (`MemoryState.anchor`),
so any split of a sequence into calls gives the result of one call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import (
    MemorySpec,
    MemoryState,
    activation,
    branch_norm,
    branch_norm_grad,
    check_inputs,
    clip_factor,
    compute_dtype,
    flush_subnormals,
    memory_apply,
    normalize,
    output_grad,
)


def memory_naive(
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
    """Run the memory over a sequence token by token.

    Args:
        q: read inputs `[B, T, H, D]`.
        k: keys (memory inputs) `[B, T, H, D]`.
        v: targets `[B, T, H, D]` (the self-generated `v_hat` in self-modifying Titans, Eq. 84).
        eta, alpha, beta: step size, retention and momentum gates `[B, T, H]` in [0, 1]; alpha (beta)
            must be None when `spec.decay` (`spec.momentum`) is False.
        state: initial fast weights and momenta (`MemoryState`, each `[B, H, d_out, d_in]`).
        spec: the memory and its inner optimizer.
        chunk_size: tokens whose gradients share one chunk-start state (D5); it changes the semantics,
            so it has no default. 1 is the exact per-token recurrence.
        check_gates: verify that the gates lie in [0, 1] (a host sync).

    Returns:
        `o [B, T, H, D]` in q's dtype, and the final `MemoryState` in the compute dtype.
    """
    alpha, beta = check_inputs(q, k, v, eta, alpha, beta, state, spec, chunk_size, check_gates)
    dt, out_dtype = compute_dtype(q, k, v, eta, *state.weights, *state.momenta), q.dtype
    q, k, v, eta, alpha, beta = (x.to(dt) for x in (q, k, v, eta, alpha, beta))
    weights = [w.to(dt) for w in state.weights]
    momenta = [s.to(dt) for s in state.momenta]
    frozen = [w.to(dt) for w in state.frozen()]  # the chunk-start state (Eqs. 90-91), maybe of an earlier call
    outputs = []
    for t in range(q.shape[1]):
        if (state.offset + t) % chunk_size == 0:
            if t > 0:  # a chunk ended: flush subnormals as the chunk form does (CPU float32 only)
                weights, momenta = flush_subnormals(weights), flush_subnormals(momenta)
            frozen = list(weights)
        inputs, errors = _frozen_terms(frozen, k[:, t], v[:, t], eta[:, t], spec)
        for i, (x, e) in enumerate(zip(inputs, errors, strict=True)):
            weights[i], momenta[i] = _step(weights[i], momenta[i], x, e, eta[:, t], alpha[:, t], beta[:, t], spec)
        outputs.append(_read(weights, q[:, t], spec))
    o = torch.stack(outputs, dim=1).to(out_dtype)
    offset = (state.offset + q.shape[1]) % chunk_size
    if offset == 0:  # the call ends at a chunk boundary
        weights, momenta = flush_subnormals(weights), flush_subnormals(momenta)
    anchor = frozen if offset > 0 else weights
    return o, MemoryState(tuple(weights), tuple(momenta), tuple(anchor), offset)


def _frozen_terms(
    weights: list[Tensor], k: Tensor, v: Tensor, eta: Tensor, spec: MemorySpec
) -> tuple[list[Tensor], list[Tensor]]:
    """Layer inputs `x` and momentum inputs `E = -eta dl/d(layer output)` of one token, per weight.

    The momentum input of weight `i` is the outer product `E_i x_i^T = -eta G_i`, with `G` clipped to
    `spec.max_grad_norm` over all weights together. Shapes: k, v `[B, H, D]`, eta `[B, H]`; returns lists in
    state order.
    """
    inputs, grads = _frozen_grads(weights, k, v, spec)
    sq = sum((g * g).sum(-1) * (x * x).sum(-1) for x, g in zip(inputs, grads, strict=True))  # ||G_t||^2
    step = -(eta * clip_factor(sq, spec))[..., None]
    return inputs, [step * g for g in grads]


def _frozen_grads(weights: list[Tensor], k: Tensor, v: Tensor, spec: MemorySpec) -> tuple[list[Tensor], list[Tensor]]:
    """Layer inputs `x_i` and output gradients `g_i` with `dl/dW_i = g_i x_i^T`, at the given weights."""
    if spec.self_values:
        v = _read(weights, v, spec)  # v_hat = M_{chunk start}(v) (Eqs. 84, 91)
    if spec.kind == "linear":
        (w,) = weights
        return [k], [output_grad(_matvec(w, k), v, spec.objective)]
    sigma, dsigma = activation(spec.activation)
    w1, w2 = weights
    z = _matvec(w2, k)  # Eq. 89: M(k) = k + W1 σ(W2 k)  (Titans: k + LN(W1 σ(W2 k)))
    h = sigma(z)
    a = _matvec(w1, h)
    r = branch_norm_grad(a, output_grad(k + branch_norm(a, spec), v, spec.objective), spec)  # dl/da
    back = _matvec(w1.transpose(-1, -2), r) * dsigma(z)  # dl/dz = (W1^T dl/da) ⊙ σ'(z)
    return [h, k], [r, back]


def _step(
    w: Tensor, s: Tensor, x: Tensor, e: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor, spec: MemorySpec
) -> tuple[Tensor, Tensor]:
    """One token's update of one weight `[B, H, o, i]` (D4)."""
    s = beta[..., None, None] * s + e[..., :, None] * x[..., None, :]  # S_t = beta S - eta G
    if spec.dgd:
        xh = normalize(x, spec.norm_eps)
        w = alpha[..., None, None] * w - eta[..., None, None] * _matvec(w, xh)[..., :, None] * xh[..., None, :]
    else:
        w = alpha[..., None, None] * w
    return w + s, s  # Eq. 88 with momentum


def _read(weights: list[Tensor], q: Tensor, spec: MemorySpec) -> Tensor:
    """`M(q)` for one token `q [B, H, D]`; after token t's update it is the inclusive read (D5)."""
    return memory_apply(weights, q[..., None, :], spec)[..., 0, :]


def _matvec(w: Tensor, x: Tensor) -> Tensor:
    """`W x` for `W [..., o, i]`, `x [..., i]`."""
    return (w @ x[..., :, None])[..., 0]
