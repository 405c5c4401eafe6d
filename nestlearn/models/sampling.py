"""Sampling the next token from logits: temperature, top-k and nucleus (top-p), with checked arguments.

What this is: `check_sampling` (ValueError naming the bad argument) and `sample` (`[B, V]` logits -> `[B]` ids).
What it is not: the generation loop (`CausalLM.generate`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError for an argument of `generate` outside its range."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an int >= 1, got {top_k!r}")
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None (off) or a number in (0, 1], got {top_p!r}")


def is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def sample(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """logits `[B, V]` -> token ids `[B]`: the argmax at temperature 0, else a draw from the softmax of
    logits / temperature restricted to the top_k most likely tokens, then to the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """`[B, V]`: -inf outside the fewest most likely tokens whose probabilities sum to at least top_p (the most
    likely token always stays)."""
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    reached = probs.cumsum(-1) - probs >= top_p  # the more likely tokens already sum to top_p
    return logits.masked_fill(torch.zeros_like(reached).scatter(-1, order, reached), float("-inf"))
