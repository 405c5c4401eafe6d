"""Small building blocks shared by the sequence layers: RMSNorm, causal short convolution, rotary embedding
(plain, or with the linear / Llama 3 frequency scaling of a pretrained checkpoint), SwiGLU MLP.

What this is: plain `nn.Module`s on `[B, T, D]` tensors; the short convolution carries an explicit decoding
state so that one pass equals the same tokens fed in pieces. What it is not: a sequence mixer (attention and the
memories live in their own files) or anything with in-context learning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """`x / rms(x) * weight`, computed in float32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (width 4 by default, D6), with an explicit decoding state.

    forward(x `[B, T, C]`, state `[B, width-1, C]` or None) -> (y `[B, T, C]`, state): the state holds the last
    `width - 1` inputs, zeros at the start of a sequence.
    """

    def __init__(self, channels: int, width: int = 4, activation: bool = True) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ShortConv width must be >= 1, got {width}")
        self.width = width
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(channels, width))
        nn.init.normal_(self.weight, std=width**-0.5)

    def initial_state(self, batch: int, like: Tensor) -> Tensor:
        return like.new_zeros(batch, self.width - 1, self.weight.shape[0])

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, _, C = x.shape
        if state is None:
            state = self.initial_state(B, x)
        if state.shape != (B, self.width - 1, C):
            raise ValueError(f"ShortConv state must be {(B, self.width - 1, C)}, got {tuple(state.shape)}")
        padded = torch.cat([state.to(x.dtype), x], dim=1)  # [B, width-1+T, C]
        y = F.conv1d(padded.transpose(1, 2), self.weight.to(x.dtype)[:, None, :], groups=C).transpose(1, 2)
        new_state = padded[:, padded.shape[1] - (self.width - 1) :]
        return (F.silu(y) if self.activation else y), new_state


# RoPE frequency scalings of pretrained checkpoints: the keys each needs besides `rope_type`
ROPE_SCALINGS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: Mapping[str, Any] | None) -> None:
    """Refuse a RoPE scaling that `RotaryEmbedding` cannot compute, naming the fix. None = plain RoPE."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"unsupported RoPE scaling rope_type {kind!r}; supported: {', '.join(map(repr, ROPE_SCALINGS))}, "
            "or None for plain RoPE"
        )
    need = set(ROPE_SCALINGS[kind])
    missing, extra = sorted(need - set(scaling)), sorted(set(scaling) - need - {"rope_type"})
    if missing or extra:
        problems = [f"{what} {', '.join(keys)}" for what, keys in (("missing", missing), ("unknown", extra)) if keys]
        raise ValueError(
            f"RoPE scaling {kind!r} takes exactly the keys rope_type, {', '.join(ROPE_SCALINGS[kind])}; "
            + "; ".join(problems)
        )
    for key in need:
        val = scaling[key]
        if isinstance(val, bool) or not isinstance(val, int | float) or not 0 < val < math.inf:
            raise ValueError(f"RoPE scaling {key} must be a finite number > 0, got {val!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(
            f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got {scaling['high_freq_factor']} "
            f"and {scaling['low_freq_factor']}"
        )


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on `[B, T, H, D]` (D even), positions `offset .. offset + T - 1`.

    Half-split layout (dims `i` and `i + D/2` rotate together), the Llama / Hugging Face convention, so that
    converted checkpoints keep their attention. Angles in float32 (float64 for float64 inputs).
    `scaling` (None = plain RoPE) slows the frequencies as a pretrained checkpoint did to extend its context:
    `{"rope_type": "linear", "factor": f}` divides every frequency by f; `"llama3"` (Llama 3.1 and later)
    keeps the frequencies with more than `high_freq_factor` periods in `original_max_position_embeddings`
    tokens, divides those with fewer than `low_freq_factor` periods by `factor`, and blends the two in between,
    linearly in the number of periods.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even head dim, got {head_dim}")
        check_rope_scaling(scaling)
        self.head_dim, self.base = head_dim, base
        self.scaling = dict(scaling) if scaling is not None else None
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self, device: torch.device | None = None) -> Tensor:
        """`base^(-2i/D)` `[D/2]`, scaled when `scaling` is set, float64; also used to refill the buffer after
        loading on the meta device."""
        inv = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim)
        if self.scaling is None:
            return inv
        factor = self.scaling["factor"]
        if self.scaling["rope_type"] == "linear":
            return inv / factor
        periods = self.scaling["original_max_position_embeddings"] * inv / (2 * math.pi)  # in the original context
        low, high = self.scaling["low_freq_factor"], self.scaling["high_freq_factor"]
        keep = ((periods - low) / (high - low)).clamp(0, 1)  # 1: keep the frequency, 0: divide it by factor
        return inv * (keep + (1 - keep) / factor)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        pos = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=dt)
        angles = pos[:, None] * self.inv_freq.to(device=x.device, dtype=dt)[None, :]  # [T, D/2]
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        x1, x2 = x.to(dt).chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SwiGLU(nn.Module):
    """Llama-style gated MLP: `W_down (silu(W_gate x) ⊙ W_up x)`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
