"""The memory-lean path equals the chunk form in float64: outputs, final states, the anchor of an open chunk and every
gradient (sequence inputs, both gates or their absence, initial weights and momenta), for the MLP and linear
memories with self-generated values, clip and branch norm, when the sequence spans several saved groups; its
custom op passes `torch.library.opcheck`.
What this is not: the chunk form's equivalence with the reference (test_memory.py) or a speed test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.ops.memory import MemorySpec, MemoryState, init_state, lean, memory_chunk
from nestlearn.ops.memory.common import spec_args
from nestlearn.ops.memory.lean import lean_memory, memory_lean

CASES = {
    "mlp": (MemorySpec(), 4, 19),
    "linear_no_momentum": (MemorySpec(kind="linear", momentum=False), 3, 13),
    "self_values_clip_no_decay": (MemorySpec(self_values=True, max_grad_norm=1.0, decay=False), 4, 16),
    "branch_norm_plain_gd": (MemorySpec(out_norm=True, dgd=False), 5, 23),
}


def inputs(spec: MemorySpec, T: int) -> list:
    B, H, D = 2, 3, 6
    g = torch.Generator().manual_seed(1)
    q, k = (F.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    eta = 0.3 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    alpha = 0.9 + 0.1 * torch.rand(B, T, H, generator=g, dtype=torch.float64) if spec.decay else None
    beta = 0.9 * torch.rand(B, T, H, generator=g, dtype=torch.float64) if spec.momentum else None
    st = init_state(spec, B, H, D, dtype=torch.float64)
    return [q, k, v, eta, alpha, beta, list(st.weights), [m + 0.1 for m in st.momenta]]


def run(fn, xs: list, spec: MemorySpec, C: int) -> list[torch.Tensor]:
    seq = [x.clone().requires_grad_() if x is not None else None for x in xs[:6]]
    ws, ms = ([t.clone().requires_grad_() for t in ts] for ts in xs[6:])
    o, st = fn(*seq, state=MemoryState(tuple(ws), tuple(ms)), spec=spec, chunk_size=C)
    loss = (o * o.cos()).sum() + sum((w * w.sin()).sum() for w in st.weights) + sum(m.sum() for m in st.momenta)
    loss = loss + sum((a**2).sum() for a in st.anchor)
    loss.backward()
    grads = [x.grad for x in seq if x is not None] + [w.grad for w in ws] + [m.grad for m in ms]
    return [o.detach(), *st.weights, *st.anchor, *grads]


@pytest.mark.parametrize("group_tokens", [8, 1024], ids=["groups", "one_group"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lean_equals_chunk_form(case: str, group_tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "GROUP_TOKENS", group_tokens)
    spec, C, T = CASES[case]
    xs = inputs(spec, T)
    for a, b in zip(run(memory_lean, xs, spec, C), run(memory_chunk, xs, spec, C), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_a_callers_autocast_does_not_reach_inside_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the op computes in float32 as without it, forward and backward alike (the backward's
    recompute runs without autocast): the same outputs and gradients, exactly."""
    monkeypatch.setattr(lean, "GROUP_TOKENS", 8)
    spec, C, T = CASES["mlp"]
    xs = [x.float() if isinstance(x, torch.Tensor) else [t.float() for t in x] for x in inputs(spec, T)]
    want = run(memory_lean, xs, spec, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(memory_lean, xs, spec, C)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_open_chunk_is_refused_with_the_fix() -> None:
    spec = MemorySpec()
    q, k, v, eta, alpha, beta, ws, ms = inputs(spec, 6)
    state = MemoryState(tuple(ws), tuple(ms), tuple(ws), 2)
    with pytest.raises(ValueError, match="starts at a chunk boundary"):
        memory_lean(q, k, v, eta, alpha, beta, state=state, spec=spec, chunk_size=4)


def test_custom_op_passes_opcheck() -> None:
    spec = MemorySpec()
    q, k, v, eta, alpha, beta, ws, ms = inputs(spec, 9)
    seq = [x.requires_grad_() for x in (q, k, v, eta, alpha, beta)]
    args = (
        *seq,
        [w.requires_grad_() for w in ws],
        [m.requires_grad_() for m in ms],
        4,
        4,
        *spec_args(spec),
        True,
    )
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(lean_memory, args, test_utils=tests)
