"""Titans' hybrids of attention and the long-term memory (Titans §4): Memory as a Context (MAC) and Memory as a
Gate (MAG). Memory as a Layer (MAL) needs no module of its own: it is a memory sub-layer followed by a
sliding-window attention sub-layer in the block (`models/block.py`).

What this is: `MemoryAsContext` and `MemoryAsGate`, `[B, T, D] -> [B, T, D]` with explicit state, built from
`Attention` and `TitansMemory`. Persistent memory tokens (Titans Eq. 19) are the attention's learned key/value
prefix; the memory itself reads only the sequence (a choice recorded in docs/decisions.md).
What it is not: the Titans LMM alone (`titans.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..ops.memory import MemorySpec
from .attention import Attention, AttentionState
from .basic import RMSNorm
from .fast_weights import Impl
from .titans import TitansMemory, TitansState


class GateCombine(nn.Module):
    """`W_o (RMSNorm_a(y) ⊙ sigmoid(RMSNorm_b(m)))`: the attention branch gated by the memory branch (Titans
    Eqs. 25, 28: "normalize the outputs ... using learnable vector-valued weights, followed by a non-linearity"),
    then an output projection, so that the block adds a small update to the residual stream at initialisation
    like every other mixer (without it the 125M MAG model's memories diverge on random tokens)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_y, self.norm_m = RMSNorm(dim), RMSNorm(dim)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.out(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))


class MAGState(NamedTuple):
    attention: AttentionState
    memory: TitansState


class MemoryAsGate(nn.Module):
    """MAG (Titans Eqs. 26-28): sliding-window attention with persistent tokens, gated by the memory's read.
    `spec`, `chunk_size`, `impl`, `save_every` and `eta_cap` configure the memory (`TitansMemory`)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        spec: MemorySpec,
        chunk_size: int,
        window: int,
        n_persistent: int,
        impl: Impl,
        rope_base: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        eta_cap: bool = True,
        save_every: int = 1,
    ) -> None:
        super().__init__()
        rope = dict(rope_base=rope_base, rope_scaling=rope_scaling)
        self.attention = Attention(dim, heads, window=window, n_persistent=n_persistent, **rope)
        self.memory = TitansMemory(dim, heads, spec=spec, chunk_size=chunk_size, impl=impl, eta_cap=eta_cap,
                                   save_every=save_every)  # fmt: skip
        self.combine = GateCombine(dim)

    def init_state(self, batch: int) -> MAGState:
        return MAGState(self.attention.init_state(batch), self.memory.init_state(batch))

    def forward(
        self, x: Tensor, state: MAGState | None = None, *, second_order: bool = False
    ) -> tuple[Tensor, MAGState]:
        """x `[B, T, D]` -> `[B, T, D]`; `second_order` as in `Attention.forward`."""
        state = state if state is not None else self.init_state(x.shape[0])
        y, att = self.attention(x, state.attention, second_order=second_order)
        m, mem = self.memory(x, state.memory)
        return self.combine(y, m), MAGState(att, mem)


class MACState(NamedTuple):
    """Attention cache of the current segment, the memory, and the memory's weights at the segment start."""

    attention: AttentionState
    memory: TitansState
    segment_weights: tuple[Tensor, ...]


class MemoryAsContext(nn.Module):
    """MAC (Titans Eqs. 21-25), segment by segment (length `segment`, aligned to absolute positions):

        h = M_{segment start}(q),  q = x W_Q                  retrieve, no write (Eq. 21)
        y = Attn([persistent || h || x])                        causal within the segment (Eqs. 22-23)
        m = M_t(y) after writing y into the memory              Eqs. 24-25
        o = W_o (RMSNorm(y) ⊙ sigmoid(RMSNorm(m)))

    A token attends to the retrieved tokens of itself and earlier tokens of its segment only (a causal reading of
    Eq. 22 for language modelling: `h_j` depends on `x_j`). `spec`, `chunk_size`, `impl`, `save_every` and `eta_cap`
    configure the memory (`TitansMemory`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        spec: MemorySpec,
        chunk_size: int,
        segment: int,
        n_persistent: int,
        impl: Impl,
        rope_base: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        eta_cap: bool = True,
        save_every: int = 1,
    ) -> None:
        super().__init__()
        self.segment = segment
        rope = dict(rope_base=rope_base, rope_scaling=rope_scaling)
        self.attention = Attention(dim, heads, segment=segment, n_persistent=n_persistent, **rope)
        self.memory = TitansMemory(
            dim,
            heads,
            spec=spec,
            chunk_size=chunk_size,
            impl=impl,
            retrieval=True,
            eta_cap=eta_cap,
            save_every=save_every,
        )
        self.combine = GateCombine(dim)

    def init_state(self, batch: int) -> MACState:
        memory = self.memory.init_state(batch)
        return MACState(self.attention.init_state(batch), memory, memory.memory.weights)

    def forward(
        self, x: Tensor, state: MACState | None = None, *, second_order: bool = False
    ) -> tuple[Tensor, MACState]:
        """x `[B, T, D]` -> `[B, T, D]`; `second_order` as in `Attention.forward`."""
        state = state if state is not None else self.init_state(x.shape[0])
        att, mem, seg_w = state
        outs, t, T = [], 0, x.shape[1]
        while t < T:
            n = min(self.segment - att.position % self.segment, T - t)
            xs = x[:, t : t + n]
            h = self.memory.retrieve(xs, seg_w)
            y, att = self.attention(xs, att, context=h, second_order=second_order)
            m, mem = self.memory(y, mem)
            outs.append(self.combine(y, m))
            if att.position % self.segment == 0:
                seg_w = mem.memory.weights
            t += n
        return torch.cat(outs, dim=1), MACState(att, mem, seg_w)
