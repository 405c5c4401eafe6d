"""Titans' neural long-term memory (LMM) as a sequence mixer: static projections feed the memory op.

What this is: `TitansMemory`, `[B, T, D] -> [B, T, D]` with an explicit state. Queries, keys and values are
static projections of x followed by a causal short convolution (width 4, SiLU); queries and keys are
L2-normalised; the per-head step size, retention and momentum gates are sigmoids of static projections
(Titans Eqs. 11-15, with the D6 layout), the step size scaled to at most `1 / chunk_size` (`step_scale`; with
`eta_cap=False` it spans [0, 1], as in Titans).
The memory is a residual MLP per head trained in context with plain GD, momentum and decay (Titans Eqs. 13-14:
`titans_spec()`), or any other `MemorySpec`. The output is normed per
head, gated and projected (Titans §3.3). `retrieve` reads the memory without writing (MAC, Eq. 21).
What it is not: self-modifying; the projections never change in context (see `self_modifying.py`).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from ..ops.memory import MemorySpec, MemoryState
from ..ops.memory.common import memory_apply
from .basic import ShortConv
from .fast_weights import (
    GatedOutput,
    GateHead,
    Impl,
    MemoryInit,
    eta_gate,
    l2norm,
    memory_op,
    split_heads,
    twice_differentiable,
)


class TitansState(NamedTuple):
    """Short-conv inputs `[B, 3, 3D]` and the memory's fast weights `[B, H, ...]`."""

    conv: Tensor
    memory: MemoryState


class TitansMemory(nn.Module):
    """Titans LMM layer.

    Args:
        dim, heads: model width and head count; each head's memory acts on `d = dim // heads`.
        spec: the memory and its inner optimizer (default: residual MLP, plain GD with momentum and decay).
        chunk_size: tokens per chunk of the parallel form (D5).
        impl: the memory op (`fast_weights.memory_op`: "auto", "adjoint", "chunk", "fused", "lean", "naive";
            one function).
        save_every: the chunk-start states the written-out backward keeps (`fast_weights.memory_op`; 1: all).
        retrieval: add the query projection of `retrieve` (MAC only; unused parameters otherwise).
        eta_cap: eta is `sigmoid(x W + b) / chunk_size` (C1, the default); False: `sigmoid(x W + b)`, spanning
            [0, 1] as in Titans, with the bias set so that it starts at the same value (`fast_weights.eta_gate`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        spec: MemorySpec,
        chunk_size: int,
        conv_width: int = 4,
        impl: Impl = "auto",
        retrieval: bool = False,
        eta_cap: bool = True,
        save_every: int = 1,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_model = {dim} is not divisible by n_heads = {heads}; pick a head count dividing it")
        self.dim, self.heads, self.spec, self.chunk_size = dim, heads, spec, chunk_size
        self.impl, self.op = impl, memory_op(impl, save_every)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = ShortConv(3 * dim, conv_width)
        start, scale = eta_gate(chunk_size, cap=eta_cap)  # starts at a tenth of the 1 / C cap either way
        self.eta = GateHead(dim, heads, init=start, scale=scale)
        self.alpha = GateHead(dim, heads, init=0.99) if spec.decay else None
        self.beta = GateHead(dim, heads, init=0.5) if spec.momentum else None
        self.retrieve_q = nn.Linear(dim, dim, bias=False) if retrieval else None
        self.init = MemoryInit(spec, 1, heads, dim // heads)
        self.output = GatedOutput(dim, heads)

    def init_state(self, batch: int) -> TitansState:
        return TitansState(self.conv.initial_state(batch, self.qkv.weight), self.init.state(batch))

    def forward(
        self, x: Tensor, state: TitansState | None = None, *, second_order: bool = False
    ) -> tuple[Tensor, TitansState]:
        """x `[B, T, D]` -> `[B, T, D]`, state carried (D12). `second_order`: the output will be differentiated
        twice (the memory then runs a twice-differentiable op, `fast_weights.twice_differentiable`)."""
        op = twice_differentiable(self.impl) if second_order else self.op
        state = state if state is not None else self.init_state(x.shape[0])
        h, conv = self.conv(self.qkv(x), state.conv)
        q, k, v = (split_heads(t, self.heads) for t in h.chunk(3, dim=-1))  # [B, T, H, d]
        gates = [g(x) if g is not None else None for g in (self.eta, self.alpha, self.beta)]
        q, k = l2norm(q), l2norm(k)
        op_args = dict(state=state.memory, spec=self.spec, chunk_size=self.chunk_size)
        o, memory = op(q, k, v.to(k.dtype), *gates, **op_args)
        return self.output(o, x), TitansState(conv, memory)

    def retrieve(self, x: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
        """`M(q)` with `q = l2norm(x W_Q)` per head and the given weights, no write (MAC, Eq. 21). -> `[B, T, D]`."""
        if self.retrieve_q is None:
            raise ValueError("this TitansMemory was built with retrieval=False; build it with retrieval=True")
        q = l2norm(split_heads(self.retrieve_q(x), self.heads)).transpose(1, 2)  # [B, H, T, d]
        w = tuple(t.to(q.dtype) for t in weights)
        return memory_apply(w, q, self.spec).transpose(1, 2).flatten(2).to(x.dtype)


INNER_GRAD_CLIP = 3.0  # per-token inner-gradient norm of the plain-GD memories (docs/decisions.md)


def titans_spec(**switches: bool | int | str | float | None) -> MemorySpec:
    """The Titans LMM default: residual MLP memory, L2 objective, plain GD with momentum and decay (Titans Eqs. 13-14),
    each token's inner gradient clipped to `INNER_GRAD_CLIP`.

    Titans' LayerNorm on the branch (`out_norm=True`) is available but off: see docs/decisions.md. Titans §3.3's
    memory as printed is `titans_spec(out_norm=True, max_grad_norm=None)` (`ModelConfig(titans_paper_memory=True)`)."""
    return MemorySpec(**{"kind": "mlp", "dgd": False, "max_grad_norm": INNER_GRAD_CLIP, **switches})
