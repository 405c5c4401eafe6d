"""The linear memory's affine form (`memory_affine`) equals the chunk form exactly in float64 (outputs, final state,
the anchor of an open chunk and every gradient, each switch, awkward shapes), and the scan op it rests on is right
on its own: `gradcheck` through the PyTorch loop, `opcheck` of both custom ops, and the Triton kernel (in its
interpreter on CPU) equal to the loop forward and backward at shapes that are not powers of 2.
What this is not: the float32 GPU path against the chunk form at the issue's shapes (test_fused.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.ops.memory import MemorySpec, MemoryState, memory_affine, memory_chunk
from nestlearn.ops.memory.scan import affine_scan, affine_scan_adjoint

FP64_RTOL = 1e-10
SWITCHES = {
    "default": {},
    "plain_gd": dict(dgd=False),
    "no_momentum": dict(momentum=False),
    "no_decay": dict(decay=False),
    "dot": dict(objective="dot"),
    "self_values": dict(self_values=True),
    "dot_self_values": dict(objective="dot", self_values=True),
}


def inputs(B: int, T: int, H: int, D: int) -> list[torch.Tensor]:
    """q, k, v, eta, alpha, beta, W_0, S_0 in float64 (unit keys and queries, gates in D4's ranges)."""
    g = torch.Generator().manual_seed(3)
    q, k = (F.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    eta = 0.5 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    alpha = 0.9 + 0.1 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    beta = 0.9 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    w0 = torch.randn(B, H, D, D, generator=g, dtype=torch.float64) / D**0.5
    s0 = 0.1 * torch.randn(B, H, D, D, generator=g, dtype=torch.float64)
    return [q, k, v, eta, alpha, beta, w0, s0]


def run(fn, xs: list[torch.Tensor], spec: MemorySpec, C: int) -> tuple[list[torch.Tensor], int]:
    """Outputs (reads, W, S, anchor), then the gradients of every input of a loss that uses all of them."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    alpha, beta = (xs[4] if spec.decay else None), (xs[5] if spec.momentum else None)
    o, st = fn(*xs[:4], alpha, beta, state=MemoryState((xs[6],), (xs[7],)), spec=spec, chunk_size=C)
    outs = [o, st.weights[0], st.momenta[0], st.anchor[0]]
    loss = sum((t * torch.cos(torch.arange(t.numel(), dtype=t.dtype).view(t.shape))).sum() for t in outs)
    loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs]
    return [t.detach() for t in outs] + grads, st.offset


@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("shape", [(4, 13, 3, 8), (4, 16, 2, 6), (8, 3, 1, 5), (1, 10, 2, 4), (16, 17, 1, 8)],
                         ids=lambda s: "C{}_T{}_H{}_D{}".format(*s))  # fmt: skip
def test_affine_form_equals_the_chunk_form_in_float64(switch: str, shape: tuple[int, int, int, int]) -> None:
    C, T, H, D = shape
    spec = MemorySpec(kind="linear", **SWITCHES[switch])
    xs = inputs(2, T, H, D)
    (got, off1), (want, off2) = run(memory_affine, xs, spec, C), run(memory_chunk, xs, spec, C)
    assert off1 == off2 == T % C
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        err = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
        assert err <= FP64_RTOL, f"tensor {i}: relative error {err:.2e}"


def test_affine_form_refuses_what_it_does_not_cover() -> None:
    """The gradient clip (not affine in the weights) and a call that finishes an open chunk."""
    xs = inputs(1, 4, 1, 4)
    state = MemoryState((xs[6],), (xs[7],))
    with pytest.raises(ValueError, match="memory_affine covers the linear memory without the gradient clip"):
        memory_affine(*xs[:6], state=state, spec=MemorySpec(kind="linear", max_grad_norm=1.0), chunk_size=2)
    with pytest.raises(ValueError, match="start at a chunk boundary"):
        memory_affine(*xs[:6], state=state._replace(anchor=state.weights, offset=1), spec=MemorySpec(kind="linear"),
                      chunk_size=2)  # fmt: skip


def scan_inputs(B: int, H: int, N: int, R: int, O: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    M = torch.randn(B, H, N, R, R, generator=g, dtype=dtype) / R**0.5
    return [M, torch.randn(B, H, N, R, O, generator=g, dtype=dtype), torch.randn(B, H, R, O, generator=g, dtype=dtype)]


def test_scan_loop_passes_gradcheck() -> None:
    xs = [x.requires_grad_() for x in scan_inputs(1, 2, 3, 4, 3, torch.float64)]
    assert torch.autograd.gradcheck(lambda M, F_, X0: affine_scan(M, F_, X0, False), xs)


@pytest.mark.parametrize("kernel", [False, True], ids=["loop", "kernel"])
def test_scan_ops_pass_opcheck(kernel: bool) -> None:
    """Schema, fake (meta) implementation and autograd registration agree with the real ops."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs = [x.to(device).requires_grad_() for x in scan_inputs(1, 2, 3, 20, 17, torch.float32)]
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(affine_scan, (*xs, kernel), test_utils=tests)
    dXs = torch.randn(1, 2, 4, 20, 17, device=device)
    torch.library.opcheck(affine_scan_adjoint, (xs[0].detach(), dXs, kernel), test_utils=tests[:2])


@pytest.mark.parametrize("shape", [(2, 3, 5, 20, 17), (1, 1, 2, 128, 64), (1, 2, 1, 16, 16)],
                         ids=lambda s: "BH{}x{}_N{}_R{}_O{}".format(*s))  # fmt: skip
def test_scan_kernel_equals_the_loop(shape: tuple[int, ...]) -> None:
    """Forward and all three gradients, float32 (the kernel's products keep float32 accuracy)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs = scan_inputs(*shape, torch.float32)
    res = []
    for kernel in (True, False):
        leaves = [x.to(device).requires_grad_() for x in xs]
        Xs = affine_scan(*leaves, kernel)
        Xs.backward(torch.cos(torch.arange(Xs.numel(), device=device, dtype=torch.float32)).view(Xs.shape))
        res.append([Xs.detach(), *(x.grad for x in leaves)])
    for i, (a, b) in enumerate(zip(*res, strict=True)):
        err = (a - b).abs().max() / b.abs().max()
        assert err <= 1e-5, f"tensor {i}: relative error {err:.2e}"
