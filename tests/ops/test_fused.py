"""The GPU path of the linear memory (`memory_fused`: the affine scan with its Triton kernel) equals the PyTorch
chunk form in float32: outputs, final states (with the anchor of a call that ends inside a chunk) and every
gradient (q, k, v, the three gates, the initial weights and momenta), at awkward shapes (T not a multiple of C,
C = 1, odd head counts, head dims that are not powers of 2), with each switch; bf16 inputs; state carried across
calls; `impl="auto"` falls back where the path does not apply. On CPU the kernel runs in Triton's interpreter
(tests/conftest.py), at tiny shapes; the `gpu` tests repeat the comparison on CUDA at the issue's shapes.
What this is not: the affine algebra's float64 exactness and the scan op's own checks (test_affine.py), or the
chunk form's equivalence with the per-token reference (test_memory.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nestlearn.ops.memory import MemorySpec, MemoryState, init_state, memory_auto, memory_chunk, memory_fused

from .test_affine import SWITCHES

pytest.importorskip("triton")
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
FP32_RTOL = 1e-5  # relative to the largest entry of each compared tensor


def inputs(B: int, T: int, H: int, D: int, spec: MemorySpec, device: str, dtype=torch.float32) -> list[torch.Tensor]:
    """q, k, v, eta, alpha, beta, W_0, S_0 (gates in D4's ranges; unit keys and queries; a non-zero momentum)."""
    g = torch.Generator().manual_seed(1)
    q, k = (F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g)
    eta = 0.5 * torch.rand(B, T, H, generator=g)
    alpha = 0.9 + 0.1 * torch.rand(B, T, H, generator=g)
    beta = 0.9 * torch.rand(B, T, H, generator=g)
    w0 = torch.randn(B, H, D, D, generator=g) / D**0.5
    s0 = 0.1 * torch.randn(B, H, D, D, generator=g)
    seq = [x.to(device, dtype) for x in (q, k, v, eta, alpha, beta)]
    return [*seq, w0.to(device), s0.to(device)]


def run(fn, xs: list[torch.Tensor], spec: MemorySpec, C: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs (reads, W, S, anchor) and the gradients of a loss that uses all of them."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    alpha = xs[4] if spec.decay else None
    beta = xs[5] if spec.momentum else None
    o, st = fn(*xs[:4], alpha, beta, state=MemoryState((xs[6],), (xs[7],)), spec=spec, chunk_size=C)
    outs = [o, st.weights[0], st.momenta[0], st.anchor[0]]
    loss = sum((t.float() * torch.cos(torch.arange(t.numel(), device=t.device).view(t.shape))).sum() for t in outs)
    loss.backward()
    used = [x for i, x in enumerate(xs) if (i != 4 or spec.decay) and (i != 5 or spec.momentum)]
    return outs, [x.grad for x in used]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = b.float().abs().max().clamp_min(1e-6)
        err = (a.float() - b.float()).abs().max() / scale
        assert err <= rtol, f"tensor {i}: relative error {err:.2e} > {rtol:.0e}"


CPU_SHAPES = [(1, 7, 3, 16), (4, 19, 2, 32), (16, 37, 3, 16), (8, 16, 1, 12), (5, 5, 2, 8)]  # (C, T, H, D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "C{}_T{}_H{}_D{}".format(*s))
def test_kernel_equals_chunk_form(shape, device: str) -> None:
    C, T, H, D = shape
    spec = MemorySpec(kind="linear")
    xs = inputs(2, T, H, D, spec, device)
    (o1, g1), (o2, g2) = run(memory_fused, xs, spec, C), run(memory_chunk, xs, spec, C)
    assert_close(o1, o2, FP32_RTOL)
    assert_close(g1, g2, FP32_RTOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_every_switch(switch: str, device: str) -> None:
    spec = MemorySpec(kind="linear", **SWITCHES[switch])
    xs = inputs(1, 21, 2, 16, spec, device)
    (o1, g1), (o2, g2) = run(memory_fused, xs, spec, 8), run(memory_chunk, xs, spec, 8)
    assert_close(o1, o2, FP32_RTOL)
    assert_close(g1, g2, FP32_RTOL)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_inputs(device: str) -> None:
    """bf16 q, k, v and gates: both paths upcast and compute in float32 (D8), so the float32 states agree to float32
    rounding and the bf16 reads to one bf16 rounding (2^-8 relative)."""
    spec = MemorySpec(kind="linear")
    xs = inputs(1, 21, 2, 16, spec, device, dtype=torch.bfloat16)
    (o1, _), (o2, _) = run(memory_fused, xs, spec, 8), run(memory_chunk, xs, spec, 8)
    assert o1[0].dtype == torch.bfloat16
    assert_close(o1[:1], o2[:1], 2**-8)
    assert_close(o1[1:], o2[1:], FP32_RTOL)


@pytest.mark.parametrize("device", DEVICES)
def test_state_carry_across_calls(device: str) -> None:
    """Calls that split the sequence at a chunk boundary continue exactly; a call that ends inside a chunk hands
    over an open chunk (offset and anchor) that `memory_auto` finishes through the chunk form, as one pass does."""
    spec = MemorySpec(kind="linear")
    q, k, v, eta, alpha, beta, w0, s0 = inputs(1, 29, 2, 16, spec, device)
    full, st_full = memory_chunk(q, k, v, eta, alpha, beta, state=MemoryState((w0,), (s0,)), spec=spec, chunk_size=8)
    for cut in (16, 11):
        a, st = memory_fused(*(x[:, :cut] for x in (q, k, v, eta, alpha, beta)), state=MemoryState((w0,), (s0,)),
                             spec=spec, chunk_size=8)  # fmt: skip
        assert st.offset == cut % 8
        b, st = memory_auto(*(x[:, cut:] for x in (q, k, v, eta, alpha, beta)), state=st, spec=spec, chunk_size=8)
        assert_close([torch.cat([a, b], 1), st.weights[0], st.momenta[0]],
                     [full, st_full.weights[0], st_full.momenta[0]], FP32_RTOL)  # fmt: skip
    with pytest.raises(ValueError, match="calls that start at a chunk boundary"):
        memory_fused(q, k, v, eta, alpha, beta, state=st._replace(offset=3), spec=spec, chunk_size=8)


def test_auto_falls_back_where_the_kernel_does_not_apply() -> None:
    """CPU (the interpreter is the tests' opt-in, not auto's), float64, the MLP memory: the chunk form. The fused
    path of the MLP memory at float64 is its written-out backward (the same function), the gradient clip
    included; with the branch LayerNorm it is refused."""
    spec = MemorySpec(kind="mlp")
    st = init_state(spec, 1, 2, 8, dtype=torch.float64)
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    gates = [torch.rand(1, 5, 2, dtype=torch.float64) for _ in range(3)]
    o1, _ = memory_auto(x, x, x, *gates, state=st, spec=spec, chunk_size=4)
    o2, _ = memory_chunk(x, x, x, *gates, state=st, spec=spec, chunk_size=4)
    assert torch.equal(o1, o2)
    o3, _ = memory_fused(x, x, x, *gates, state=st, spec=spec, chunk_size=4)
    torch.testing.assert_close(o3, o2, rtol=0, atol=1e-12)
    clipped = dataclasses.replace(spec, max_grad_norm=1.0)
    o4, _ = memory_fused(x, x, x, *gates, state=st, spec=clipped, chunk_size=4)
    torch.testing.assert_close(o4, memory_chunk(x, x, x, *gates, state=st, spec=clipped, chunk_size=4)[0], rtol=0,
                               atol=1e-12)  # fmt: skip
    normed = dataclasses.replace(spec, out_norm=True)
    with pytest.raises(ValueError, match="memory_fused covers the MLP memory without the branch LayerNorm"):
        memory_fused(x, x, x, *gates, state=st, spec=normed, chunk_size=4)


GPU_SHAPES = [(C, T, H, D) for C in (1, 16, 64) for T, H, D in ((150, 3, 32), (200, 5, 64), (130, 2, 128))]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "C{}_T{}_H{}_D{}".format(*s))
def test_kernel_equals_chunk_form_on_the_gpu(shape) -> None:
    C, T, H, D = shape
    spec = MemorySpec(kind="linear")
    xs = inputs(2, T, H, D, spec, "cuda")
    (o1, g1), (o2, g2) = run(memory_fused, xs, spec, C), run(memory_chunk, xs, spec, C)
    assert_close(o1, o2, FP32_RTOL)
    assert_close(g1, g2, FP32_RTOL)


@pytest.mark.gpu
def test_layer_auto_takes_the_kernel_on_the_gpu() -> None:
    """A Titans layer with a linear memory gives the same output through impl="auto" (the GPU path) and "chunk"."""
    from nestlearn.layers.titans import TitansMemory, titans_spec

    spec = dataclasses.replace(titans_spec(kind="linear"), max_grad_norm=None)
    torch.manual_seed(0)
    auto = TitansMemory(64, 4, spec=spec, chunk_size=16, impl="auto").cuda()
    chunk = TitansMemory(64, 4, spec=spec, chunk_size=16, impl="chunk").cuda()
    chunk.load_state_dict(auto.state_dict())
    x = torch.randn(2, 100, 64, device="cuda")
    torch.testing.assert_close(auto(x)[0], chunk(x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_hope_layer_with_a_linear_memory_takes_the_gpu_path(device: str) -> None:
    """Self-modifying Titans (HOPE's mixer) with linear memories: impl="fused" runs every memory (the projection
    memories' calls that finish an open chunk through the chunk form) and equals impl="chunk" in float32, output
    and parameter gradients."""
    from nestlearn.layers.self_modifying import SelfModifyingTitans

    spec = MemorySpec(kind="linear")
    x = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(3)).to(device)
    res = []
    for impl in ("fused", "chunk"):
        torch.manual_seed(0)
        layer = SelfModifyingTitans(32, 2, spec=spec, mem_chunk=4, proj_chunk=8, impl=impl).to(device)
        y = layer(x, layer.init_state(2))[0]
        y.pow(2).sum().backward()
        res.append([y.detach(), *(p.grad for p in layer.parameters() if p.grad is not None)])
    assert_close(res[0], res[1], 1e-4)  # float32 through chained memories: 1.9e-5 measured (CPU interpreter)
