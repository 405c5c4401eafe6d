"""Titans LMM and the MAC / MAG hybrids: wiring against hand compositions, chunk form == reference op, state carry,
and the step-size cap that keeps the chunked plain-GD memory bounded."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers.hybrid import MemoryAsContext, MemoryAsGate
from nestlearn.layers.titans import TitansMemory, titans_spec
from nestlearn.ops.memory import memory_naive


def lmm(impl: str = "chunk", chunk: int = 4, dim: int = 16, heads: int = 2, **spec) -> TitansMemory:
    torch.manual_seed(0)
    return TitansMemory(dim, heads, spec=titans_spec(**spec), chunk_size=chunk, impl=impl, retrieval=True).double()


def test_lmm_is_the_titans_recurrence() -> None:
    """Static q/k/v + short conv + L2 norm, gates from static projections, then the memory op (Titans Eqs. 11-15)."""
    layer = lmm()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y, _ = layer(x)
    h, _ = layer.conv(layer.qkv(x))
    q, k, v = (t.reshape(2, 13, 2, 8) for t in h.chunk(3, dim=-1))
    eta = torch.sigmoid(layer.eta.proj(x)) / 4  # step size capped at 1 / chunk_size
    alpha, beta = torch.sigmoid(layer.alpha.proj(x)), torch.sigmoid(layer.beta.proj(x))
    o, _ = memory_naive(
        F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, eta, alpha, beta,
        state=layer.init.state(2), spec=layer.spec, chunk_size=4,
    )  # fmt: skip
    torch.testing.assert_close(y, layer.output(o, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["chunk", "adjoint"])
@pytest.mark.parametrize("switches", [{}, {"momentum": False}, {"decay": False}, {"dgd": True}])
def test_lmm_chunk_equals_reference_op(switches: dict, impl: str) -> None:
    """Outputs, final state and parameter gradients agree in float64 (T = 23 not a multiple of C = 8, d = 5), the
    chunk form and the written-out backward (which takes the clip) against the per-token reference."""
    x = torch.randn(2, 23, 15, dtype=torch.float64)
    results = []
    for name in (impl, "naive"):
        layer = lmm(name, chunk=8, dim=15, heads=3, **switches)
        y, st = layer(x)
        loss = (y * torch.linspace(-1, 1, 15, dtype=torch.float64)).sum() + sum(w.sum() for w in st.memory.weights)
        grads = torch.autograd.grad(loss, [p for p in layer.parameters() if p is not layer.retrieve_q.weight])
        results.append([y.detach(), *(w.detach() for w in st.memory.weights), *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_step_cap_keeps_repeated_keys_bounded() -> None:
    """A long run of near-identical tokens (chunk 64, the worst case of frozen chunk gradients) stays finite."""
    layer = lmm(chunk=64, dim=64, heads=2)
    x = torch.randn(1, 1, 64, dtype=torch.float64).expand(1, 1024, 64) + 0.01 * torch.randn(1, 1024, 64)
    with torch.no_grad():
        y, st = layer(x)
    assert torch.isfinite(y).all() and max(w.abs().max().item() for w in st.memory.weights) < 10


def mac(segment: int) -> MemoryAsContext:
    torch.manual_seed(0)
    layer = MemoryAsContext(16, 2, spec=titans_spec(), chunk_size=4, segment=segment, n_persistent=3, impl="chunk")
    return layer.double()


def test_mac_follows_titans_equations() -> None:
    """Two segments by hand: retrieve with the segment-start memory, attend, write y, gate (Eqs. 21-25)."""
    layer = mac(segment=8)
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    y, _ = layer(x)
    st = layer.init_state(2)
    att, mem, outs = st.attention, st.memory, []
    for seg in (x[:, :8], x[:, 8:]):
        h = layer.memory.retrieve(seg, mem.memory.weights)
        a, att = layer.attention(seg, att, context=h)
        m, mem = layer.memory(a, mem)
        outs.append(layer.combine(a, m))
    torch.testing.assert_close(y, torch.cat(outs, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", ["mac", "mag"])
def test_hybrids_carry_state(make: str) -> None:
    torch.manual_seed(0)
    if make == "mac":
        layer = mac(segment=6)
    else:
        layer = MemoryAsGate(16, 2, spec=titans_spec(), chunk_size=4, window=5, n_persistent=2, impl="chunk").double()
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    y, _ = layer(x)
    for splits in ([5], [3, 6, 7, 12], list(range(1, 17))):
        outs, st = [], None
        for lo, hi in itertools.pairwise([0, *splits, 17]):
            yi, st = layer(x[:, lo:hi], st)
            outs.append(yi)
        torch.testing.assert_close(torch.cat(outs, 1), y, rtol=0, atol=1e-12)


def test_retrieve_needs_retrieval() -> None:
    layer = TitansMemory(16, 2, spec=titans_spec(), chunk_size=4)
    with pytest.raises(ValueError, match="retrieval=True"):
        layer.retrieve(torch.randn(1, 3, 16), layer.init.state(1).weights)
