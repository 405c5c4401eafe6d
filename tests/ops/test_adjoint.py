"""The MLP memory's hand-derived backward (`memory_adjoint`) equals the chunk form under autograd: in float64 on
outputs, final states, the anchor of an open chunk and every gradient (q, k, v, the three gates, both initial
weights and momenta) for every switch it covers (plain GD, no momentum, no decay, the dot objective, the three
activations, self-generated values, the gradient clip) at awkward shapes; one matrix step's adjoint equals
autograd through that step on its own; sparse chunk starts (`save_every`) give the dense results exactly; float32
on the GPU; what it does not cover is refused with the fix; the op is a `torch.library` custom op (opcheck) that
`torch.compile(fullgraph=True)` traces as one node with the eager results.
What this is not: the chunk form's own equivalence with the per-token reference (test_memory.py)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from nestlearn.ops.memory import MemorySpec, MemoryState, init_state, memory_chunk
from nestlearn.ops.memory.adjoint import (
    _Coef,
    _prepare,
    _prepare_adjoint,
    adjoint_memory,
    matrix_step,
    matrix_step_adjoint,
    memory_adjoint,
    mixed_precision,
    saved_count,
)
from nestlearn.ops.memory.chunk import _coefficients
from nestlearn.ops.memory.common import spec_args

from .test_affine import SWITCHES as LINEAR_SWITCHES

FP64_RTOL = 1e-10
# and the activations, and the gradient clip (the Titans variants' memories: plain GD; and with DGD) at a norm that
# clips about half of the test inputs' tokens
SWITCHES = LINEAR_SWITCHES | {
    "gelu": dict(activation="gelu"),
    "tanh": dict(activation="tanh"),
    "clip": dict(dgd=False, max_grad_norm=1.5),
    "clip_dgd": dict(max_grad_norm=1.5),
}


def inputs(B: int, T: int, H: int, D: int, spec: MemorySpec, dtype=torch.float64) -> list[torch.Tensor]:
    """q, k, v, eta, alpha, beta, W1, W2, S1, S2 (unit keys and queries, eta <= 0.4, non-zero momenta)."""
    g = torch.Generator().manual_seed(2)
    q, k = (F.normalize(torch.randn(B, T, H, D, generator=g, dtype=dtype), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    eta = 0.4 * torch.rand(B, T, H, generator=g, dtype=dtype)
    alpha = 0.9 + 0.1 * torch.rand(B, T, H, generator=g, dtype=dtype)
    beta = 0.9 * torch.rand(B, T, H, generator=g, dtype=dtype)
    st = init_state(spec, B, H, D, dtype=dtype, generator=g)
    momenta = [0.1 * torch.randn(m.shape, generator=g, dtype=dtype) for m in st.momenta]
    return [q, k, v, eta, alpha, beta, *st.weights, *momenta]


def run(fn, xs: list[torch.Tensor], spec: MemorySpec, C: int) -> list[torch.Tensor]:
    """Outputs (reads, W1, W2, S1, S2, anchors), then the gradients of every input of a loss using all of them."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    alpha, beta = (xs[4] if spec.decay else None), (xs[5] if spec.momentum else None)
    o, st = fn(*xs[:4], alpha, beta, state=MemoryState(tuple(xs[6:8]), tuple(xs[8:10])), spec=spec, chunk_size=C)
    outs = [o, *st.weights, *st.momenta, *st.anchor]
    weights = (torch.cos(torch.arange(t.numel(), device=t.device, dtype=t.dtype).view(t.shape)) for t in outs)
    sum((t * w).sum() for t, w in zip(outs, weights, strict=True)).backward()
    return [t.detach() for t in outs] + [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        err = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
        assert err <= rtol, f"tensor {i}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("shape", [(4, 13, 3, 6), (4, 16, 2, 5), (8, 3, 1, 6), (8, 8, 1, 6), (1, 7, 2, 4),
                                   (16, 17, 1, 6)],
                         ids=lambda s: "C{}_T{}_H{}_D{}".format(*s))  # fmt: skip
def test_adjoint_equals_autograd_through_the_chunk_form(switch: str, shape: tuple[int, int, int, int]) -> None:
    C, T, H, D = shape
    spec = MemorySpec(kind="mlp", expansion=2, **SWITCHES[switch])
    xs = inputs(2, T, H, D, spec)
    assert_close(run(memory_adjoint, xs, spec, C), run(memory_chunk, xs, spec, C), FP64_RTOL)


@pytest.mark.parametrize("dgd", [True, False])
def test_one_matrix_step_adjoint_equals_autograd(dgd: bool) -> None:
    """`matrix_step_adjoint` against autograd through `matrix_step`: every input and every gate product."""
    g = torch.Generator().manual_seed(4)
    B, H, n, o, i = 1, 2, 5, 3, 4
    dt = torch.float64
    W, S = (torch.randn(B, H, o, i, generator=g, dtype=dt) for _ in range(2))
    X, Q = (torch.randn(B, H, n, i, generator=g, dtype=dt) for _ in range(2))
    E = torch.randn(B, H, n, o, generator=g, dtype=dt)
    gates = [torch.rand(B, H, 1, n, generator=g, dtype=dt) * s + lo for s, lo in ((0.4, 0), (0.1, 0.9), (0.9, 0))]
    c = _Coef(*(f[:, :, 0] for f in _coefficients(*gates, last=n - 1)))  # the last row one token early
    leaves = [t.clone().requires_grad_() for t in (W, S, X, F.normalize(X, dim=-1), Q, E, *c)]
    lc = _Coef(*leaves[6:])
    O, Wn, Sn, _ = matrix_step(*leaves[:6], lc, dgd)
    dO, dWn, dSn = (torch.randn(t.shape, generator=g, dtype=dt) for t in (O, Wn, Sn))
    want = torch.autograd.grad((O, Wn, Sn), leaves, (dO, dWn, dSn), allow_unused=True)
    *_, st = matrix_step(W, S, X, leaves[3].detach(), Q, E, c, dgd)
    dc = {name: torch.zeros_like(getattr(c, name)) for name in _Coef._fields}
    got = [*matrix_step_adjoint(W, S, X, leaves[3].detach(), Q, E, c, st, dO, dWn, dSn, dc)]
    got = [got[0], got[1], got[2], got[3], got[4], got[5], *(dc[name] for name in _Coef._fields)]
    want = [w if w is not None else torch.zeros_like(x) for w, x in zip(want, leaves, strict=True)]
    assert_close(got, want, FP64_RTOL)


@pytest.mark.parametrize(("T", "C"), [(13, 4), (16, 16), (3, 8), (17, 16)])
def test_layout_adjoint_equals_autograd_through_the_layout(T: int, C: int) -> None:
    """The backward's written-out adjoint of the chunk layout, the keys' normalisation and every gate product
    (`_prepare_adjoint`) against autograd through `_prepare`: T not a multiple of C, one short chunk, gates of
    exactly 0 and 1 among them."""
    spec = MemorySpec(kind="mlp")
    seq = [t.clone().requires_grad_() for t in inputs(2, T, 3, 5, spec)[:6]]
    with torch.no_grad():
        seq[4][0, :2] = 0.0  # a decay gate of exactly 0, then one of exactly 1
        seq[5][1, 1] = 1.0
    prep = _prepare(seq, C, spec, mixed=False)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in prep.flat()]
    want = torch.autograd.grad(prep.flat(), seq, grads)
    detached = _prepare([t.detach() for t in seq], C, spec, mixed=False)
    assert_close(_prepare_adjoint(detached, T, spec, grads), list(want), FP64_RTOL)


@pytest.mark.gpu
def test_layout_adjoint_is_captured_in_a_cuda_graph() -> None:
    """The backward's layout adjoint (indexed adds included) replays in a CUDA graph, as the models' captured
    training steps need: no host sync inside it."""
    spec = MemorySpec(kind="mlp")
    seq = [t.float().cuda() for t in inputs(2, 100, 3, 8, spec)[:6]]
    prep = _prepare(seq, 16, spec, mixed=False)
    grads = [torch.randn_like(t) for t in prep.flat()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        _prepare_adjoint(prep, 100, spec, grads)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = _prepare_adjoint(prep, 100, spec, grads)
    for g in grads:
        g.copy_(torch.randn_like(g))
    graph.replay()
    leaves = [t.clone().requires_grad_() for t in seq]
    want = torch.autograd.grad(_prepare(leaves, 16, spec, mixed=False).flat(), leaves, grads)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_what_it_does_not_cover_is_refused() -> None:
    spec = MemorySpec(kind="mlp", out_norm=True)
    xs = inputs(1, 4, 1, 4, spec)
    with pytest.raises(ValueError, match="use memory_chunk"):
        memory_adjoint(*xs[:6], state=MemoryState(tuple(xs[6:8]), tuple(xs[8:10])), spec=spec, chunk_size=2)


@pytest.mark.parametrize(("T", "save_every"), [(8, 1), (7, 1), (3, 1), (15, 2), (7, 0)])
def test_custom_op_passes_opcheck(T: int, save_every: int) -> None:
    """Schema, fake tensors and the autograd registration, with a closed and an open last chunk, one chunk, and
    sparse chunk starts."""
    spec = MemorySpec(kind="mlp", expansion=2)
    xs = [x.requires_grad_() for x in inputs(1, T, 2, 4, spec)]
    args = (*xs[:6], xs[6:8], xs[8:10], 4, *spec_args(spec), False, False, save_every, False)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(adjoint_memory, args, test_utils=tests)


@pytest.mark.parametrize("T", [3, 4, 9])
def test_a_one_chunk_call_keeps_no_copy_of_its_state(T: int) -> None:
    """A call within one chunk (HOPE's projection memories: one call per chunk) returns no start-state copies;
    the backward takes the input state (its gradients: the shapes above, e.g. C = 8 with T = 3 and 8)."""
    spec = MemorySpec(kind="mlp", expansion=2)
    xs = inputs(1, T, 2, 4, spec)
    out = adjoint_memory(*xs[:6], xs[6:8], xs[8:10], 4, *spec_args(spec), False, False, 1, False)
    assert [s.shape[2] for s in out[7:]] == [0 if T <= 4 else 3] * 4


@pytest.mark.parametrize("switch", ["default", "clip", "self_values"])
@pytest.mark.parametrize(("T", "save_every"), [(23, 2), (23, 3), (24, 4), (23, 0), (8, 0), (23, 9), (23, 5)])
def test_sparse_chunk_starts_give_the_same_gradients(switch: str, T: int, save_every: int) -> None:
    """Every `save_every`-th chunk start saved (or none), the rest recomputed in the backward: outputs, states and
    every gradient equal the dense ones exactly (the same arithmetic), with an open last chunk (T = 23, C = 4),
    a closed one, one segment, a last segment of one chunk (23, 5) and a save interval longer than the call; the
    op saves `saved_count` starts."""
    spec = MemorySpec(kind="mlp", expansion=2, **SWITCHES[switch])
    xs = inputs(2, T, 2, 4, spec)
    sparse = functools.partial(memory_adjoint, save_every=save_every)
    assert_close(run(sparse, xs, spec, 4), run(memory_adjoint, xs, spec, 4), 0.0)
    out = adjoint_memory(*xs[:6], xs[6:8], xs[8:10], 4, *spec_args(spec), False, False, save_every, False)
    assert [s.shape[2] for s in out[7:]] == [saved_count(-(-T // 4), save_every)] * 4
    assert saved_count(6, 1) == 6 and saved_count(6, 4) == 2 and saved_count(6, 0) == 0 and saved_count(1, 1) == 0


@pytest.mark.parametrize("save_every", [1, 2])
def test_a_callers_autocast_does_not_reach_inside_the_op(save_every: int) -> None:
    """Under bf16 autocast (the models' training dtype) the op computes in float32 as without it: the gate
    products' matrix products would otherwise come out in bf16 in the forward and in float32 in the backward's
    recompute (and the kernels would take bf16 inputs). Outputs and gradients equal, exactly."""
    spec = MemorySpec(kind="mlp", expansion=2)
    xs = [x.float() for x in inputs(2, 23, 2, 4, spec)]
    op = functools.partial(memory_adjoint, save_every=save_every)
    want = run(op, xs, spec, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(op, xs, spec, 4)
    assert_close(got, want, 0.0)


def test_mixed_precision_reads_autocast_without_asking_torch_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a call runs under bf16 / float16 autocast, decided without `torch.amp.is_autocast_available`, which
    torch 2.11's dynamo cannot trace (on the H200 it broke a compiled HOPE's graph 13 times, Titans' 6)."""

    def untraceable(kind: str) -> bool:
        raise AssertionError("is_autocast_available called inside a memory call")

    q = torch.zeros(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # traced whole (a break raises under fullgraph)
        assert torch.compile(mixed_precision, fullgraph=True, backend="eager")(q)
    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    assert not mixed_precision(q) and not mixed_precision(q.to("meta"))
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert mixed_precision(q) and not mixed_precision(q.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert not mixed_precision(q)


def test_save_every_is_checked() -> None:
    spec = MemorySpec(kind="mlp", expansion=2)
    xs = inputs(1, 8, 1, 4, spec)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="save_every must be an int >= 0"):
            memory_adjoint(*xs[:6], state=MemoryState(tuple(xs[6:8]), tuple(xs[8:10])), spec=spec, chunk_size=4,
                           save_every=bad)  # fmt: skip


def test_compiled_in_one_graph_equals_eager() -> None:
    """`torch.compile(fullgraph=True)` (aot_eager: the tracing, without a C++ toolchain) through the op and its
    backward: the same outputs and gradients in float64, and the op is one node of the traced graph."""
    spec = MemorySpec(kind="mlp", expansion=2)
    xs = inputs(2, 11, 2, 4, spec)
    nodes: list[str] = []

    def backend(gm: torch.fx.GraphModule, example: list) -> object:
        nodes.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.debugging.aot_eager(gm, example)

    compiled = torch.compile(memory_adjoint, fullgraph=True, backend=backend)
    assert_close(run(compiled, xs, spec, 4), run(memory_adjoint, xs, spec, 4), FP64_RTOL)
    assert sum("adjoint_memory" in n for n in nodes) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("switch", ["default", "self_values"])
def test_adjoint_equals_the_chunk_form_on_the_gpu(switch: str) -> None:
    """float32 at the issue's head dim (d = 64, hidden 256), C = 64 with a partial last chunk."""
    spec = MemorySpec(kind="mlp", **SWITCHES[switch])
    xs = [x.float().cuda() for x in inputs(2, 300, 3, 64, spec)]
    assert_close(run(memory_adjoint, xs, spec, 64), run(memory_chunk, xs, spec, 64), 1e-5)
