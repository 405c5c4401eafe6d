"""Basic blocks: RMSNorm formula, short-conv state carry, rotary relative positions, SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers import RMSNorm, RotaryEmbedding, ShortConv, SwiGLU


def test_rmsnorm_formula_and_dtype() -> None:
    norm = RMSNorm(12)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 12))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight.double()
    torch.testing.assert_close(norm.double()(x), want)
    assert norm(torch.randn(2, 3, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("width", [1, 2, 4])
def test_short_conv_is_causal_and_carries_state(width: int) -> None:
    """One pass == pieces with state carried == token by token; output t ignores inputs after t."""
    conv = ShortConv(6, width).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    full, st = conv(x)
    y1, s1 = conv(x[:, :4])
    y2, s2 = conv(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full)
    torch.testing.assert_close(s2, st)
    s, steps = None, []
    for t in range(11):
        y, s = conv(x[:, t : t + 1], s)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full)
    x2 = x.clone()
    x2[:, 7:] += 1.0
    torch.testing.assert_close(conv(x2)[0][:, :7], full[:, :7])
    # reference: explicit causal sum, no activation
    lin = ShortConv(6, width, activation=False).double()
    ref = sum(F.pad(x, (0, 0, j, 0))[:, : x.shape[1]] * lin.weight[:, width - 1 - j] for j in range(width))
    torch.testing.assert_close(lin(x)[0], ref)


def test_short_conv_bad_state() -> None:
    conv = ShortConv(6, 4)
    with pytest.raises(ValueError, match="state must be"):
        conv(torch.randn(2, 3, 6), torch.zeros(2, 2, 6))


def test_rotary_relative_and_offset() -> None:
    """<R(q, m), R(k, n)> depends on m - n only; an offset equals slicing a longer sequence."""
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    a = (rope(q, offset=5) * rope(k, offset=2)).sum()
    b = (rope(q, offset=13) * rope(k, offset=10)).sum()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 10, 3, 8)
    torch.testing.assert_close(rope(x)[:, 6:], rope(x[:, 6:], offset=6))
    torch.testing.assert_close(rope(x).norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError, match="even head dim"):
        RotaryEmbedding(7)


def test_swiglu_shapes_and_formula() -> None:
    mlp = SwiGLU(8, 20).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    want = (F.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), want)
