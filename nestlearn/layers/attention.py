"""Causal softmax attention (SDPA) with RoPE and a KV cache as explicit state.

What this is: the attention of Transformer++ and Hope-Attention (full causal), of Titans MAG / MAL (sliding
window) and of Titans MAC (attention confined to the current segment, with the memory's retrieved tokens as
extra context). Learned persistent memory tokens (Titans Eq. 19) are a per-layer key/value prefix that every
query sees. What it is not: a fused kernel; the masks are dense boolean `[T, K]` tensors given to SDPA.

Positions: a query at absolute position p sees a key at position p' when p' <= p, and p' > p - window (sliding
window), and p' // segment == p // segment (segments); persistent tokens are always visible and carry no
position. Context tokens (MAC's retrieved memory) sit at the positions of the tokens they were retrieved for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .basic import RotaryEmbedding

# cuDNN's SDPA backend failed with CUDNN_STATUS_INTERNAL_ERROR on the H100 (torch 2.11, bf16, [1, 12, 4096, 64]
# causal); flash, memory-efficient and math kernels cover every case.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _backends(second_order: bool) -> list[SDPBackend]:
    """SDPA kernels allowed: the math kernel only when the output will be differentiated twice (the flash and
    memory-efficient kernels have no double backward; full meta-gradients through online CMS updates need it)."""
    return [SDPBackend.MATH] if second_order else _BACKENDS


class AttentionState(NamedTuple):
    """KV cache `[B, H, L, d]` of the last L tokens (positions `position - L .. position - 1`), the cache of
    context tokens at the same positions (L = 0 when unused), and the number of tokens seen."""

    k: Tensor
    v: Tensor
    ctx_k: Tensor
    ctx_v: Tensor
    position: int


class Attention(nn.Module):
    """Multi-head causal attention `[B, T, D] -> [B, T, D]` with an explicit KV-cache state.

    Args:
        dim, heads: model width and head count (`dim % heads == 0`, even head dim for RoPE).
        window: sliding-window length (None = full causal).
        segment: confine attention to aligned segments of this length (Titans MAC); None = off.
        n_persistent: learned key/value tokens per head seen by every query (Titans Eq. 19).
        max_len: longest sequence the full-attention cache may reach; None = unlimited.
        kv_heads: key/value heads (grouped-query attention: each serves `heads / kv_heads` query heads);
            None = heads.
        qkv_bias: biases on the query, key and value projections (Qwen2).
        rope_base, rope_scaling: the rotary embedding's base and frequency scaling (`RotaryEmbedding`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        window: int | None = None,
        segment: int | None = None,
        n_persistent: int = 0,
        max_len: int | None = None,
        rope_base: float = 10000.0,
        kv_heads: int | None = None,
        qkv_bias: bool = False,
        rope_scaling: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_model = {dim} is not divisible by n_heads = {heads}; pick a head count dividing it")
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"kv_heads = {kv_heads} must divide heads = {heads}")
        for name, val in (("window", window), ("segment", segment), ("max_len", max_len)):
            if val is not None and val < 1:
                raise ValueError(f"attention {name} must be a positive int or None, got {val}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.window, self.segment, self.max_len = window, segment, max_len
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_base, rope_scaling)
        self.n_persistent = n_persistent
        if n_persistent and kv_heads != heads:
            raise ValueError("persistent tokens need kv_heads == heads")
        if n_persistent:
            self.persistent_k = nn.Parameter(0.02 * torch.randn(heads, n_persistent, self.head_dim))
            self.persistent_v = nn.Parameter(0.02 * torch.randn(heads, n_persistent, self.head_dim))

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> AttentionState:
        """An empty cache on the layer's device (or the given one)."""
        device, dtype = device or self.q_proj.weight.device, dtype or self.q_proj.weight.dtype
        empty = torch.zeros(batch, self.kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionState(empty, empty, empty, empty, 0)

    def forward(
        self,
        x: Tensor,
        state: AttentionState | None = None,
        context: Tensor | None = None,
        *,
        second_order: bool = False,
    ) -> tuple[Tensor, AttentionState]:
        """x `[B, T, D]`; context `[B, T, D]` (optional, one context token per input token) -> `[B, T, D]`.

        `second_order`: the output will be differentiated twice (SDPA's math kernel is then used)."""
        B, T, _ = x.shape
        state = state if state is not None else self.init_state(B, x.device, x.dtype)
        pos = state.position
        if self.max_len is not None and pos + T > self.max_len:
            raise ValueError(
                f"attention reached {pos + T} tokens but max_seq_len is {self.max_len}; raise max_seq_len in the "
                "config, reset the state, or use a windowed / recurrent variant"
            )
        q = self.rope(self._split(self.q_proj(x)), pos).transpose(1, 2)  # [B, H, T, d]
        k, v = self._keys_values(x, pos)
        k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        ctx_k, ctx_v = state.ctx_k, state.ctx_v
        if context is not None:
            ck, cv = self._keys_values(context, pos)
            ctx_k, ctx_v = torch.cat([ctx_k, ck], dim=2), torch.cat([ctx_v, cv], dim=2)
        o = self._attend(q, k, v, ctx_k, ctx_v, pos, second_order)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        end = pos + T
        keep = self._cache_length(end, k.shape[2])
        ckeep = min(keep, ctx_k.shape[2])
        new = AttentionState(
            k[:, :, k.shape[2] - keep :],
            v[:, :, v.shape[2] - keep :],
            ctx_k[:, :, ctx_k.shape[2] - ckeep :],
            ctx_v[:, :, ctx_v.shape[2] - ckeep :],
            end,
        )
        return y, new

    def _split(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:2], -1, self.head_dim)

    def _keys_values(self, x: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        k = self.rope(self._split(self.k_proj(x)), pos).transpose(1, 2)
        return k, self._split(self.v_proj(x)).transpose(1, 2)

    def _cache_length(self, end: int, have: int) -> int:
        """How many of the latest keys a later query can still see."""
        keep = have
        if self.window is not None:
            keep = min(keep, self.window - 1)
        if self.segment is not None:
            keep = min(keep, end % self.segment)
        return keep

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, ctx_k: Tensor, ctx_v: Tensor, pos: int, second_order: bool
    ) -> Tensor:
        B, _, T, _ = q.shape
        if self.kv_heads != self.heads:  # grouped-query attention: key/value head j serves query heads j*r .. j*r+r-1
            r = self.heads // self.kv_heads
            k, v, ctx_k, ctx_v = (t.repeat_interleave(r, dim=1) for t in (k, v, ctx_k, ctx_v))
        n_p = self.n_persistent
        plain = n_p == 0 and ctx_k.shape[2] == 0 and k.shape[2] == T and self.window is None and self.segment is None
        if plain:  # the training fast path: SDPA's own causal kernel
            with sdpa_kernel(_backends(second_order)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        qpos = torch.arange(pos, pos + T, device=q.device)
        parts_k, parts_v, masks = [], [], []
        if n_p:
            parts_k.append(self.persistent_k.to(q.dtype).expand(B, -1, -1, -1))
            parts_v.append(self.persistent_v.to(q.dtype).expand(B, -1, -1, -1))
            masks.append(torch.ones(T, n_p, dtype=torch.bool, device=q.device))
        for kk, vv in ((ctx_k, ctx_v), (k, v)):
            kpos = torch.arange(pos + T - kk.shape[2], pos + T, device=q.device)
            parts_k.append(kk)
            parts_v.append(vv)
            masks.append(self._visible(qpos, kpos))
        mask = torch.cat(masks, dim=1)
        with sdpa_kernel(_backends(second_order)):
            return F.scaled_dot_product_attention(q, torch.cat(parts_k, 2), torch.cat(parts_v, 2), attn_mask=mask)

    def _visible(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        """`[T, K]` boolean: causal, within the window, within the segment."""
        qp, kp = qpos[:, None], kpos[None, :]
        ok = kp <= qp
        if self.window is not None:
            ok = ok & (kp > qp - self.window)
        if self.segment is not None:
            ok = ok & (kp // self.segment == qp // self.segment)
        return ok
