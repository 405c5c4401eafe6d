"""The MLP memory's kernels (`_mlp_kernels.py`: `memory_adjoint(kernel=True)`, `memory_fused` for the MLP memory)
equal `adjoint.py`'s PyTorch loops in float32: outputs, final state, anchor (a call ending inside a chunk) and
every gradient (the backward kernel from the forward kernel's saved chunk starts), with each switch (DGD off,
momentum off, decay off, the dot objective, self-generated values, gelu and tanh, the gradient clip), chunks of
16 and 32 tokens, T not a multiple of C; chunks of 64 (the models' default); bf16 inputs; sparse chunk starts;
state carried across calls; HOPE's mixer through them; `kernel_supports` refuses what they do not hold. On CPU
the kernels run in Triton's interpreter (tests/conftest.py) at tiny shapes; the `gpu` tests repeat the
comparison on CUDA at the 20M preset's head shape (d = 32, expansion 4) on inputs that keep that memory finite
(`_gentle`). What this is not: the written-out backward's own checks against autograd (test_adjoint.py)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from nestlearn.ops.memory import MemorySpec, MemoryState
from nestlearn.ops.memory.adjoint import kernel_supports, memory_adjoint

from .test_adjoint import SWITCHES, assert_close, inputs, run

pytest.importorskip("triton")
FP32_RTOL = 1e-5  # relative to the largest entry of each compared tensor
TF32_RTOL = 5e-3  # one-pass tf32 products on a GPU (measured on the H200: 2.3e-3 and 3.0e-3 at most)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AT_64 = ["default", "plain_gd", "dot", "self_values", "clip"]  # the switches the 64-token tests take


def _compare(spec: MemorySpec, B: int, T: int, H: int, D: int, C: int, device: str, *, gentle: bool = False) -> None:
    """`gentle`: steps ten times smaller and decay ten times slower (`_gentle`)."""
    xs = [x.float().to(device) for x in (_gentle if gentle else list)(inputs(B, T, H, D, spec))]
    kernel = functools.partial(memory_adjoint, kernel=True)
    assert kernel_supports(xs[0], MemoryState(tuple(xs[6:8]), tuple(xs[8:10])), C)
    assert_close(run(kernel, xs, spec, C), run(memory_adjoint, xs, spec, C), FP32_RTOL)


@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("shape", [(16, 40), (32, 32)], ids=lambda s: "C{}_T{}".format(*s))
def test_kernel_forward_equals_the_chunk_loop(switch: str, shape: tuple[int, int]) -> None:
    """Every switch at two shapes: three 16-token chunks, the last open (the anchor, the backward's alternating
    state-adjoint sets past their first swap), and one whole 32-token chunk (a call ending on a chunk boundary, no
    saved starts). A whole 16-token chunk (C16_T16, dropped for CI's time: about 16 s in the interpreter) ran no
    branch these two do not: its chunk length is the first shape's, its one-chunk call and boundary end the
    second's."""
    C, T = shape
    spec = MemorySpec(kind="mlp", expansion=2, **SWITCHES[switch])
    _compare(spec, 1, T, 2, 16, C, DEVICE)


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the kernel launchers called from now on (each launch still runs)."""
    from nestlearn.ops.memory import _mlp_kernels

    launches: list[str] = []
    for name in ("launch_mlp_forward", "launch_mlp_backward"):
        launch = getattr(_mlp_kernels, name)
        monkeypatch.setattr(
            _mlp_kernels, name, lambda *a, _l=launch, _n=name, **kw: launches.append(_n) or _l(*a, **kw)
        )
    return launches


@pytest.mark.parametrize("switch", AT_64)
def test_kernels_at_64_token_chunks(switch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 64 (the models' default), where the backward kernel runs from its scratch stash: one launch of
    each kernel, the loops' results."""
    launches = _count_launches(monkeypatch)
    _compare(MemorySpec(kind="mlp", expansion=2, **SWITCHES[switch]), 1, 80, 1, 32, 64, DEVICE)
    assert sorted(launches) == ["launch_mlp_backward", "launch_mlp_forward"]


@pytest.mark.parametrize("switch", ["default", "clip"])
def test_heads_wider_than_the_chunk(switch: str) -> None:
    """Heads of 32 at 16-token chunks (the 20M preset's heads at C = 16): the backward kernel's scratch slots hold
    the state's adjoint `[D, E]` as well as the `[n, E]` dot operands (a slot of `n E` floats let W2's adjoint
    overwrite W1's: wrong key gradients on the H200, relative error 0.48)."""
    _compare(MemorySpec(kind="mlp", expansion=2, **SWITCHES[switch]), 1, 40, 1, 32, 16, DEVICE)


@pytest.mark.parametrize(("switch", "save_every"), [("default", 2), ("clip", 0)])
def test_sparse_chunk_starts_through_the_kernels(switch: str, save_every: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse chunk starts with the kernels (T = 56, C = 16: four chunks, the last open): each segment's starts
    recomputed by the forward kernel, then walked back by the backward kernel; the dense kernels' results
    exactly."""
    spec = MemorySpec(kind="mlp", expansion=2, **SWITCHES[switch])
    xs = [x.float().to(DEVICE) for x in inputs(1, 56, 2, 16, spec)]
    dense = run(functools.partial(memory_adjoint, kernel=True), xs, spec, 16)
    launches = _count_launches(monkeypatch)
    sparse = run(functools.partial(memory_adjoint, kernel=True, save_every=save_every), xs, spec, 16)
    assert_close(sparse, dense, 0.0)
    segments = 2 if save_every == 2 else 1
    assert launches.count("launch_mlp_forward") == 1 + segments and launches.count("launch_mlp_backward") == segments


def test_bf16_inputs() -> None:
    """bf16 q, k, v and gates with float32 states (the models under autocast): the kernels and the loops both
    upcast and compute in float32 (D8): the float32 states within 1e-5, the bf16 reads and input gradients within
    2^-7 relative (one or two bf16 roundings)."""
    spec = MemorySpec(kind="mlp", expansion=2)
    xs = inputs(1, 40, 2, 16, spec)
    xs = [x.to(torch.bfloat16) for x in xs[:6]] + [x.float() for x in xs[6:]]
    got = run(functools.partial(memory_adjoint, kernel=True), xs, spec, 16)
    want = run(memory_adjoint, xs, spec, 16)
    assert got[0].dtype == torch.bfloat16 and got[7].dtype == torch.bfloat16
    assert_close(got[1:7], want[1:7], FP32_RTOL)
    assert_close([t.float() for t in got[:1] + got[7:13]], [t.float() for t in want[:1] + want[7:13]], 2**-7)
    assert_close(got[13:], want[13:], FP32_RTOL)  # the float32 states' gradients


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
    ok = [x.float().to(DEVICE) for x in inputs(1, 40, 2, 16, spec)]
    state = MemoryState(tuple(ok[6:8]), tuple(ok[8:10]))
    assert kernel_supports(ok[0], state, 16)
    assert not kernel_supports(ok[0], state, 8)  # chunks under 16 tokens
    long = [x.float().to(DEVICE) for x in inputs(1, 128, 2, 32, spec)]
    long_state = MemoryState(tuple(long[6:8]), tuple(long[8:10]))
    assert kernel_supports(long[0], long_state, 64) and not kernel_supports(long[0], long_state, 128)
    assert kernel_supports(long[0], long_state, 64, backward=True)
    assert not kernel_supports(long[0], long_state, 128, backward=True)  # the kernels' shared memory
    # 16-wide heads, or a hidden width of 32: chunks of 32 tokens at most (adjoint.MIN_HEAD_AT_64, MIN_HIDDEN_AT_64)
    narrow = [x.float().to(DEVICE) for x in inputs(1, 128, 2, 16, spec)]
    narrow_state = MemoryState(tuple(narrow[6:8]), tuple(narrow[8:10]))
    assert kernel_supports(narrow[0], narrow_state, 32) and not kernel_supports(narrow[0], narrow_state, 64)
    assert not kernel_supports(narrow[0], narrow_state, 64, backward=True)
    square = [x.float().to(DEVICE) for x in inputs(1, 128, 2, 32, MemorySpec(kind="mlp", expansion=1))]  # E = 32
    square_state = MemoryState(tuple(square[6:8]), tuple(square[8:10]))
    assert kernel_supports(square[0], square_state, 32) and not kernel_supports(square[0], square_state, 64)
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


def _gentle(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs a wide memory stays finite on over hundreds of tokens: eta / 10 and 1 - alpha / 10. With
    `inputs`' steps (eta up to 0.4) the 20M head shape's memory (E = 128) diverges: in float64 its outputs reach
    1e73 within 100 tokens without decay and 1e9 with tanh, so float32 results compared there mean nothing; with
    these its state stays within 0.7 and the float32 loop is within 1.2e-6 of the float64 loop (CPU, T = 300)."""
    q, k, v, eta, alpha, *rest = xs
    return [q, k, v, eta / 10, 1 - (1 - alpha) / 10, *rest]


GPU_CASES = [(s, 16) for s in sorted(SWITCHES)] + [("default", 32)] + [(s, 64) for s in AT_64]


@pytest.mark.gpu
@pytest.mark.parametrize(("switch", "C"), GPU_CASES, ids=[f"{s}-C{c}" for s, c in GPU_CASES])
def test_kernel_on_the_gpu_at_the_20M_head_shape(switch: str, C: int) -> None:
    """Every switch at 16-token chunks; 32 and 64 (whose backward takes minutes to compile, once per variant and
    machine: `_mlp_kernels.products`) for the default and the switches that change the backward's equations most
    (DGD off, the dot objective, self-generated values, the Titans variants' clip)."""
    spec = MemorySpec(kind="mlp", expansion=4, **SWITCHES[switch])
    _compare(spec, 2, 300, 3, 32, C, "cuda", gentle=True)


def test_gentle_inputs_keep_the_20M_head_shape_finite() -> None:
    """What the GPU test relies on, checked in float64 on CPU for the switch that grows fastest (no decay)."""
    spec = MemorySpec(kind="mlp", expansion=4, decay=False)
    q, k, v, eta, _, beta, *state = _gentle(inputs(1, 300, 1, 32, spec))
    o, end = memory_adjoint(q, k, v, eta, None, beta, state=MemoryState(tuple(state[:2]), tuple(state[2:])),
                            spec=spec, chunk_size=64)  # fmt: skip
    assert o.abs().max() < 2 and max(float(w.abs().max()) for w in end.weights) < 1


@pytest.mark.gpu
@pytest.mark.parametrize("switch", ["default", "clip"])
def test_auto_takes_the_kernels_on_the_gpu(switch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`memory_auto` (the layers' default) runs both kernels for the MLP memory on CUDA where they apply, with the
    chunk form's results (float32, 1e-5): HOPE's memories and the Titans variants' (clipped)."""
    from nestlearn.ops.memory import memory_auto, memory_chunk

    launches = _count_launches(monkeypatch)
    spec = MemorySpec(kind="mlp", expansion=4, **SWITCHES[switch])
    xs = [x.float().cuda() for x in _gentle(inputs(2, 300, 3, 32, spec))]
    assert_close(run(memory_auto, xs, spec, 64), run(memory_chunk, xs, spec, 64), FP32_RTOL)
    assert sorted(launches) == ["launch_mlp_backward", "launch_mlp_forward"]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_kernel_the_gpu_cannot_launch_runs_the_loop(direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel variant that needs more shared memory than the card has (Triton's `OutOfResources`, raised at its
    first launch, before any work) runs that direction's PyTorch loop with the loop's results, warns once, and is
    not tried again in the process."""
    from triton.runtime.errors import OutOfResources

    from nestlearn.ops.memory import _mlp_kernels, adjoint

    monkeypatch.setattr(adjoint, "_UNLAUNCHABLE", set())
    tried: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        tried.append(direction)
        raise OutOfResources(327680, 232448, "shared memory")

    monkeypatch.setattr(_mlp_kernels, f"launch_mlp_{direction}", refuse)
    spec = MemorySpec(kind="mlp", expansion=2)
    xs = [x.float().to(DEVICE) for x in inputs(1, 40, 2, 16, spec)]
    kernel = functools.partial(memory_adjoint, kernel=True)
    with pytest.warns(UserWarning, match=rf"{direction} kernel does not fit this GPU at 16-token chunks, head dim 16"):
        got = run(kernel, xs, spec, 16)
    assert_close(got, run(memory_adjoint, xs, spec, 16), FP32_RTOL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run(kernel, xs, spec, 16)
    assert not [w for w in caught if "does not fit" in str(w.message)]
    assert tried == [direction] and all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


def test_kernel_precision_is_chosen_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`NESTLEARN_KERNEL_PRECISION` picks the GPU dots' precision: "auto" when unset (one-pass tf32 for a call under
    bf16 / float16 autocast, tf32x3 otherwise), or the one it names for every call; the interpreter always computes
    exactly; a value that is not a precision is refused with the choices."""
    from nestlearn.ops.memory._mlp_kernels import PRECISION_ENV, products

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert [products(gpu), products(gpu, mixed=True), products(cpu, mixed=True)] == ["tf32x3", "tf32", "ieee"]
    for chosen in ("tf32x3", "tf32", "ieee"):
        monkeypatch.setenv(PRECISION_ENV, chosen)
        assert [products(gpu), products(gpu, mixed=True), products(cpu)] == [chosen, chosen, "ieee"]
    monkeypatch.setenv(PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match=r"NESTLEARN_KERNEL_PRECISION='fp8' is not a kernel precision; use one of"):
        products(gpu)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_the_kernels_hear_whether_the_call_runs_under_autocast(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both launches hear whether the caller runs under bf16 autocast (what `products` needs for "auto"): the
    forward from the caller's autocast state, the backward, which runs where autocast is off, from the forward's
    record. The results: the float32 loops' to 1e-5 in the interpreter (exact products either way); on a GPU under
    autocast the one-pass tf32 products' 5e-3 (`test_one_pass_tf32_stays_near_the_float32_results`; here the
    H200 gave 3.0e-3 on the outputs)."""
    from nestlearn.ops.memory import _mlp_kernels

    heard: list[tuple[str, bool]] = []
    for name in ("launch_mlp_forward", "launch_mlp_backward"):
        launch = getattr(_mlp_kernels, name)
        monkeypatch.setattr(
            _mlp_kernels, name, lambda *a, _l=launch, _n=name, **kw: heard.append((_n, kw["mixed"])) or _l(*a, **kw)
        )
    spec = MemorySpec(kind="mlp", expansion=2)
    xs = [x.float().to(DEVICE) for x in inputs(1, 32, 2, 16, spec)]
    kernel = functools.partial(memory_adjoint, kernel=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        got = run(kernel, xs, spec, 16)
    assert heard == [("launch_mlp_forward", autocast), ("launch_mlp_backward", autocast)]
    assert_close(got, run(memory_adjoint, xs, spec, 16), TF32_RTOL if autocast and DEVICE == "cuda" else FP32_RTOL)


@pytest.mark.gpu
def test_one_pass_tf32_stays_near_the_float32_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `NESTLEARN_KERNEL_PRECISION=tf32` the kernels (20M head shape, 64-token chunks) stay within `TF32_RTOL`
    of the float32 loops' results, relative to each tensor's largest entry (emulated on CPU, the chunk form with
    tf32 products: ~1.5e-4 on states, ~5e-4 on gradients in Frobenius norm; the H200's largest entry-wise error
    here was 2.3e-3, on the final momentum; docs/decisions.md)."""
    from nestlearn.ops.memory._mlp_kernels import PRECISION_ENV

    monkeypatch.setenv(PRECISION_ENV, "tf32")
    spec = MemorySpec(kind="mlp", expansion=4)
    xs = [x.float().cuda() for x in _gentle(inputs(2, 300, 3, 32, spec))]
    kernel = functools.partial(memory_adjoint, kernel=True)
    assert_close(run(kernel, xs, spec, 64), run(memory_adjoint, xs, spec, 64), TF32_RTOL)
