"""The MLP memory's kernels (`_mlp_kernels.py`: `memory_adjoint(kernel=True)`, `memory_fused` for the MLP memory)
equal `adjoint.py`'s PyTorch loops in float32: outputs, final state, anchor (a call ending inside a chunk) and
every gradient (the backward kernel from the forward kernel's saved chunk starts), with each switch (DGD off,
momentum off, decay off, the dot objective, self-generated values, gelu and tanh), chunks of 16 and 32 tokens, T
not a multiple of C; state carried across calls; HOPE's mixer through them; `kernel_supports` refuses what they
do not hold. On CPU the kernels run in Triton's interpreter (tests/conftest.py) at tiny shapes; the `gpu` tests
repeat the comparison on CUDA at the 20M preset's head shape (d = 32, expansion 4). What this is not: the
written-out backward's own checks against autograd (test_adjoint.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from nestlearn.ops.memory import MemorySpec, MemoryState
from nestlearn.ops.memory.adjoint import kernel_supports, memory_adjoint

from .test_adjoint import SWITCHES, assert_close, inputs, run

pytest.importorskip("triton")
FP32_RTOL = 1e-5  # relative to the largest entry of each compared tensor
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _compare(spec: MemorySpec, B: int, T: int, H: int, D: int, C: int, device: str) -> None:
    xs = [x.float().to(device) for x in inputs(B, T, H, D, spec)]
    kernel = functools.partial(memory_adjoint, kernel=True)
    assert kernel_supports(xs[0], MemoryState(tuple(xs[6:8]), tuple(xs[8:10])), C)
    assert_close(run(kernel, xs, spec, C), run(memory_adjoint, xs, spec, C), FP32_RTOL)


@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("shape", [(16, 40), (32, 32), (16, 16)], ids=lambda s: "C{}_T{}".format(*s))
def test_kernel_forward_equals_the_chunk_loop(switch: str, shape: tuple[int, int]) -> None:
    C, T = shape
    spec = MemorySpec(kind="mlp", expansion=2, **SWITCHES[switch])
    _compare(spec, 1, T, 2, 16, C, DEVICE)


def test_state_carried_across_calls_equals_one_call() -> None:
    spec = MemorySpec(kind="mlp", expansion=2)
    q, k, v, eta, alpha, beta, *state = [x.float() for x in inputs(1, 48, 2, 16, spec)]
    st = MemoryState(tuple(state[:2]), tuple(state[2:]))
    call = functools.partial(memory_adjoint, spec=spec, chunk_size=16, kernel=True)
    whole, end = call(q, k, v, eta, alpha, beta, state=st)
    first, mid = call(*(x[:, :32] for x in (q, k, v, eta, alpha, beta)), state=st)
    second, end2 = call(*(x[:, 32:] for x in (q, k, v, eta, alpha, beta)), state=mid)
    assert_close([torch.cat([first, second], 1), *end2.weights, *end2.momenta],
                 [whole, *end.weights, *end.momenta], FP32_RTOL)  # fmt: skip


def test_kernel_supports_refuses_what_it_does_not_hold() -> None:
    spec = MemorySpec(kind="mlp", expansion=2)
    ok = [x.float() for x in inputs(1, 40, 2, 16, spec)]
    state = MemoryState(tuple(ok[6:8]), tuple(ok[8:10]))
    assert kernel_supports(ok[0], state, 16)
    assert not kernel_supports(ok[0], state, 8)  # chunks under 16 tokens
    assert not kernel_supports(ok[0][:, :12], state, 16)  # a call shorter than 16 tokens: one chunk of 12
    assert not kernel_supports(ok[0].double(), MemoryState(*(tuple(w.double() for w in ws) for ws in (
        state.weights, state.momenta))), 16)  # fmt: skip
    odd = [x.float() for x in inputs(1, 40, 2, 12, spec)]  # head dim 12: not a power of two
    assert not kernel_supports(odd[0], MemoryState(tuple(odd[6:8]), tuple(odd[8:10])), 16)
    big = MemorySpec(kind="mlp", expansion=4)
    wide = [x.float() for x in inputs(1, 16, 1, 64, big)]  # D * E = 64 * 256 does not fit on chip
    assert not kernel_supports(wide[0], MemoryState(tuple(wide[6:8]), tuple(wide[8:10])), 16)
    # where it does not apply, kernel=True computes the loop's results
    xs = [x.float() for x in inputs(1, 40, 2, 12, spec)]
    assert_close(run(functools.partial(memory_adjoint, kernel=True), xs, spec, 8), run(memory_adjoint, xs, spec, 8),
                 0.0)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("C", [16, 64])
def test_kernel_on_the_gpu_at_the_20M_head_shape(switch: str, C: int) -> None:
    spec = MemorySpec(kind="mlp", expansion=4, **SWITCHES[switch])
    _compare(spec, 2, 300, 3, 32, C, "cuda")


def test_hope_layer_with_mlp_memories_takes_the_kernels() -> None:
    """Self-modifying Titans (HOPE's mixer) with MLP memories (head dim 16, expansion 2, chunks of 16):
    impl="fused" runs every memory through the kernels and equals impl="chunk" in float32, output and parameter
    gradients."""
    from nestlearn.layers.self_modifying import SelfModifyingTitans
    from nestlearn.ops.memory import _mlp_kernels

    spec = MemorySpec(kind="mlp", expansion=2)
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    launches, launch = [], _mlp_kernels.launch_mlp_backward
    res = []
    for impl in ("fused", "chunk"):
        torch.manual_seed(0)
        layer = SelfModifyingTitans(32, 2, spec=spec, mem_chunk=16, proj_chunk=16, impl=impl).to(DEVICE)
        _mlp_kernels.launch_mlp_backward = lambda *a, **kw: launches.append(1) or launch(*a, **kw)
        try:
            y = layer(x, layer.init_state(2))[0]
            y.pow(2).sum().backward()
        finally:
            _mlp_kernels.launch_mlp_backward = launch
        res.append([y.detach(), *(p.grad for p in layer.parameters() if p.grad is not None)])
    assert len(launches) == 3  # the main memory's call and the projection memories' two full chunks of 16
    assert_close(res[0], res[1], 1e-4)
