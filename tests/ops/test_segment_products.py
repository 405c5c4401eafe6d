"""The gate products' own backward (`chunk._SegmentProducts`): division-free, exact with gates of exactly 0, twice
differentiable, equal to autograd through `torch.cumprod`, and capturable in a CUDA graph (cumprod's backward
reads a value back to the host, which capture forbids)."""

from __future__ import annotations

import pytest
import torch

from nestlearn.ops.memory.chunk import _segment_products


def _gates(*shape: int, device: str = "cpu") -> torch.Tensor:
    g = torch.rand(*shape, dtype=torch.float64, device=device)
    g[0, 0, 3] = 0.0  # a gate of exactly 0 inside a chunk
    g[-1, -1, 0] = 0.0  # and at a chunk start
    return g.requires_grad_()


def _by_cumprod(g: torch.Tensor) -> torch.Tensor:
    n = g.shape[-1]
    g1 = torch.cat([torch.ones_like(g[..., :1]), g], dim=-1)
    idx = torch.arange(n + 1, device=g.device)
    after = idx[None, :] > idx[:, None]
    factors = torch.where(after, g1[..., None, :], torch.ones_like(g1[..., None, :]))
    return torch.cumprod(factors, dim=-1).transpose(-1, -2).masked_fill(after, 0)


def test_values_and_gradients_equal_cumprod() -> None:
    g = _gates(3, 2, 7)
    w = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(_segment_products(g), _by_cumprod(g), rtol=0, atol=0)
    ours = torch.autograd.grad((_segment_products(g) * w).sum(), g)[0]
    ref = torch.autograd.grad((_by_cumprod(g) * w).sum(), g)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-14)


def test_gradcheck_and_gradgradcheck_with_zero_gates() -> None:
    g = _gates(2, 2, 5)
    assert torch.autograd.gradcheck(_segment_products, (g,))
    assert torch.autograd.gradgradcheck(_segment_products, (g,))


@pytest.mark.gpu
def test_forward_and_backward_are_captured_in_a_cuda_graph() -> None:
    g = _gates(4, 8, 64, device="cuda").detach().float().requires_grad_()
    w = torch.randn(4, 8, 65, 65, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        torch.autograd.grad((_segment_products(g) * w).sum(), g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grad = torch.autograd.grad((_segment_products(g) * w).sum(), g)[0]
    with torch.no_grad():
        g.copy_(torch.rand_like(g))
    graph.replay()
    torch.testing.assert_close(grad, torch.autograd.grad((_by_cumprod(g) * w).sum(), g)[0], rtol=1e-5, atol=1e-6)
