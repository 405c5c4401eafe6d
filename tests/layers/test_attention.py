"""Attention: against a dense softmax reference for every masking mode; KV-cache state carry; limits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nestlearn.layers.attention import Attention

MODES = {
    "full": {},
    "window": {"window": 5},
    "segment": {"segment": 6},
    "persistent_window": {"window": 4, "n_persistent": 3},
    "persistent_segment": {"segment": 7, "n_persistent": 2},
}


def reference(att: Attention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention written out: scores over [persistent | context | x], masked by position rules."""
    B, T, D = x.shape
    H, d = att.heads, att.head_dim

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, T, H, d)

    q = att.rope(heads(att.q_proj(x))).transpose(1, 2)
    ks, vs, ok = [], [], []
    pos = torch.arange(T)
    visible = pos[None, :] <= pos[:, None]
    if att.window is not None:
        visible &= pos[None, :] > pos[:, None] - att.window
    if att.segment is not None:
        visible &= pos[None, :] // att.segment == pos[:, None] // att.segment
    n_p = att.n_persistent
    if n_p:
        ks.append(att.persistent_k.expand(B, -1, -1, -1))
        vs.append(att.persistent_v.expand(B, -1, -1, -1))
        ok.append(torch.ones(T, n_p, dtype=torch.bool))
    for src in [context, x] if context is not None else [x]:
        ks.append(att.rope(heads(att.k_proj(src))).transpose(1, 2))
        vs.append(heads(att.v_proj(src)).transpose(1, 2))
        ok.append(visible)
    k, v, mask = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(ok, 1)
    scores = (q @ k.mT / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    o = scores.softmax(-1) @ v
    return att.o_proj(o.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("with_context", [False, True])
def test_matches_reference_and_carries_state(mode: str, with_context: bool) -> None:
    """One pass == dense reference; pieces and token-by-token decoding with the KV cache == one pass."""
    att = Attention(24, 4, **MODES[mode]).double()
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    ctx = torch.randn(2, 19, 24, dtype=torch.float64) if with_context else None
    y, _ = att(x, context=ctx)
    torch.testing.assert_close(y, reference(att, x, ctx), rtol=0, atol=1e-12)
    for splits in ([7], list(range(1, 19))):
        outs, st = [], None
        for lo, hi in itertools.pairwise([0, *splits, 19]):
            part_ctx = ctx[:, lo:hi] if ctx is not None else None
            yi, st = att(x[:, lo:hi], st, context=part_ctx)
            outs.append(yi)
        torch.testing.assert_close(torch.cat(outs, 1), y, rtol=0, atol=1e-12)


def test_cache_stays_bounded_for_windows_and_segments() -> None:
    """Decoding cost per token does not grow with context for windowed / segmented attention."""
    for kw, bound in (({"window": 4}, 3), ({"segment": 6}, 5)):
        att = Attention(16, 2, **kw)
        st = None
        for _ in range(40):
            _, st = att(torch.randn(1, 1, 16), st)
            assert st.k.shape[2] <= bound
    full = Attention(16, 2)
    _, st = full(torch.randn(1, 40, 16))
    assert st.k.shape[2] == 40


def test_limits_and_bad_arguments() -> None:
    att = Attention(16, 2, max_len=10)
    _, st = att(torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match="max_seq_len is 10"):
        att(torch.randn(1, 3, 16), st)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="window must be a positive int"):
        Attention(16, 2, window=0)
