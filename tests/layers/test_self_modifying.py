"""Self-modifying Titans: an independent per-token reference (autograd inner gradients) for every ablation, the
chunk form against the float64 reference op, state carry, gradcheck."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers import self_modifying
from nestlearn.layers.fast_weights import memory_op
from nestlearn.layers.self_modifying import SelfModifyingTitans
from nestlearn.ops.memory import MemorySpec, init_state, memory_chunk

ABLATIONS = {
    "hope": {},
    "no_dgd": {"dgd": False},
    "no_momentum": {"momentum": False},
    "no_weight_decay": {"decay": False},
    "static_k": {"adaptive_k": False},
    "static_v": {"adaptive_v": False},
    "adaptive_q": {"adaptive_q": True},
}
SPEC_KEYS = {"dgd", "momentum", "decay"}


def build(ablation: dict, dim: int = 16, heads: int = 2, mem_chunk: int = 1, proj_chunk: int = 1, **kw):
    spec = MemorySpec(**{k: v for k, v in ablation.items() if k in SPEC_KEYS})
    flags = {k: v for k, v in ablation.items() if k not in SPEC_KEYS}
    torch.manual_seed(0)
    layer = SelfModifyingTitans(dim, heads, spec=spec, mem_chunk=mem_chunk, proj_chunk=proj_chunk, **flags, **kw)
    return layer.double()


def mlp(w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Eq. 89 per head: x `[B, H, d]`, W1 `[B, H, d, e]`, W2 `[B, H, e, d]`."""
    w1, w2 = w
    return x + (w1 @ F.silu(w2 @ x[..., None]))[..., 0]


def dgd_step(w, s, G, inputs, eta, alpha, beta, spec: MemorySpec):
    """D4 for each weight with its layer input: S = beta S - eta G; W = W (alpha I - eta x̂ x̂^T) + S."""
    new_w, new_s = [], []
    e, b, a = eta[..., None, None], beta[..., None, None], alpha[..., None, None]
    for wi, si, gi, xi in zip(w, s, G, inputs, strict=True):
        si = b * si - e * gi
        if spec.dgd:
            xh = xi / torch.sqrt((xi * xi).sum(-1, keepdim=True) + spec.norm_eps**2)
            wi = wi @ (a * torch.eye(xi.shape[-1], dtype=xi.dtype) - e * xh[..., :, None] * xh[..., None, :]) + si
        else:
            wi = a * wi + si
        new_w.append(wi)
        new_s.append(si)
    return new_w, new_s


def inner_gradient(w: list[torch.Tensor], k: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """dl/dW of l = 1/2 ||M(k) - v_hat||^2 by autograd (target held fixed)."""
    leaves = [t.detach().requires_grad_() for t in w]
    with torch.enable_grad():
        loss = 0.5 * ((mlp(leaves, k.detach()) - target.detach()) ** 2).sum()
        return list(torch.autograd.grad(loss, leaves))


@torch.no_grad()
def reference(layer: SelfModifyingTitans, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 83-88 token by token (C_mem = C_proj = 1), written from the paper with autograd inner gradients."""
    B, T, D = x.shape
    H, d, spec = layer.heads, layer.head_dim, layer.spec
    h, _ = layer.conv(layer.in_proj(x))
    parts = [p.reshape(B, T, H, d) for p in h.split(D, dim=-1)]
    beta = layer.beta(x) if spec.momentum else torch.zeros(B, T, H, dtype=x.dtype)
    weights = {}
    for i, n in enumerate(layer.adaptive):
        weights[n] = [w[None].expand(B, -1, -1, -1) for w in layer.proj_init.select(i, H)]
    for i, n in enumerate(layer.static):
        weights[n] = [w[None].expand(B, -1, -1, -1) for w in layer.static_init.select(i, H)]
    weights["mem"] = [w[None].expand(B, -1, -1, -1) for w in layer.mem_init.select(0, H)]
    momenta = {n: [torch.zeros_like(w) for w in ws] for n, ws in weights.items()}
    outs = []
    for t in range(T):
        u = parts[0][:, t]
        gen = {n: mlp(weights[n], u) for n in layer.names}
        k, v = F.normalize(gen["k"], dim=-1), F.normalize(gen["v"], dim=-1)
        gate = {n: torch.sigmoid((gen[n] * layer.readout[n]).sum(-1) + layer.readout_bias[n]) for n in layer.readout}
        eta, alpha = layer.eta_scale * gate["eta"], gate.get("alpha", torch.ones_like(gate["eta"]))
        q = F.normalize(gen["q"] if "q" in gen else parts[1][:, t], dim=-1)
        for n in [*layer.adaptive, "mem"]:
            target = mlp(weights[n], v)  # Eq. 84: v_hat = M(v)
            G = inner_gradient(weights[n], k, target)
            w2 = weights[n][1]
            inputs = [F.silu((w2 @ k[..., None])[..., 0]), k]  # layer inputs of W1 and W2
            weights[n], momenta[n] = dgd_step(weights[n], momenta[n], G, inputs, eta, alpha, beta[:, t], spec)
        outs.append(mlp(weights["mem"], q))
    return layer.output(torch.stack(outs, dim=1), x)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_matches_paper_reference(name: str) -> None:
    """Every ablation of Table 6 equals its own per-token reference to 1e-10 (float64)."""
    layer = build(ABLATIONS[name])
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, _ = layer(x)
    torch.testing.assert_close(y, reference(layer, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(set(ABLATIONS) - {"hope"}))
def test_each_ablation_changes_the_computation(name: str) -> None:
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    base, _ = build({})(x)
    other, _ = build(ABLATIONS[name])(x)
    assert (base - other).abs().max() > 1e-4


def _grads(layer: SelfModifyingTitans, x: torch.Tensor):
    x = x.clone().requires_grad_()
    y, st = layer(x)
    outs = [y, *st.proj.weights, *st.proj.momenta, *st.memory.weights, *st.memory.momenta]
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [o.detach() for o in outs], [gr for gr in grads if gr is not None]


@pytest.mark.parametrize(("name", "T", "mem_chunk", "proj_chunk"), [("hope", 23, 8, 3), ("adaptive_q", 17, 5, 4)])
def test_chunk_equals_reference_op(name: str, T: int, mem_chunk: int, proj_chunk: int) -> None:
    """impl="chunk" == impl="naive" on outputs, final states and every gradient; awkward shapes (d = 5)."""
    kw = dict(dim=15, heads=3, mem_chunk=mem_chunk, proj_chunk=proj_chunk)
    x = torch.randn(2, T, 15, dtype=torch.float64)
    out_c, grad_c = _grads(build(ABLATIONS[name], impl="chunk", **kw), x)
    out_n, grad_n = _grads(build(ABLATIONS[name], impl="naive", **kw), x)
    for a, b in itertools.chain(zip(out_n, out_c, strict=True), zip(grad_n, grad_c, strict=True)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


@pytest.mark.parametrize("splits", [[5], [1, 2, 9, 10, 20], list(range(1, 23))])
def test_pieces_and_token_by_token_equal_one_pass(splits: list[int]) -> None:
    layer = build({}, mem_chunk=8, proj_chunk=3)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    y, st = layer(x)
    outs, carried = [], None
    for lo, hi in itertools.pairwise([0, *splits, 23]):
        yi, carried = layer(x[:, lo:hi], carried)
        outs.append(yi)
    torch.testing.assert_close(torch.cat(outs, 1), y, rtol=0, atol=1e-12)
    for a, b in zip(st.memory.weights + st.proj.weights, carried.memory.weights + carried.proj.weights, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("save_every", [2, 0])
def test_recomputed_segments_give_the_same_gradients(save_every: int) -> None:
    """`save_every` != 1 (impl "adjoint"): the projection loop in checkpointed segments, the main memory with sparse
    chunk starts; two calls with the state carried across an open chunk (T = 5 + 18, C_proj = 3, C_mem = 4), with
    gradients: the same outputs, states and parameter gradients as keeping everything."""
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    results = []
    for every in (1, save_every):
        layer = build({}, mem_chunk=4, proj_chunk=3, impl="adjoint", save_every=every)
        y1, st = layer(x[:, :5])
        y2, st = layer(x[:, 5:], st)
        loss = (torch.cat([y1, y2], 1) * torch.cos(torch.arange(23.0, dtype=x.dtype))[:, None]).sum()
        loss = loss + sum(w.sum() for w in (*st.proj.weights, *st.memory.weights))
        grads = torch.autograd.grad(loss, list(layer.parameters()))
        results.append([y1, y2, *st.proj.weights, *st.memory.weights, *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_recomputed_segments_keep_less() -> None:
    """What autograd keeps for the backward (bytes packed through `saved_tensors_hooks`, counted per save, one
    23-token call): with `save_every` 2 under a fifth of what keeping every chunk's states takes, with 0 less
    again (measured: 2.24 MB, 233 KB, 168 KB)."""
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    kept = {}
    for every in (1, 2, 0):
        layer = build({}, mem_chunk=4, proj_chunk=3, impl="adjoint", save_every=every)
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        kept[every] = sum(sizes)
    assert kept[2] < kept[1] / 5 and kept[0] < kept[2]


def test_save_every_reaches_only_the_ops_that_take_it() -> None:
    """A call finishing an open chunk (the fused path's fallback) and a memory the written-out backward does not
    cover (the linear memory under "adjoint") run the chunk form, without `save_every`."""
    spec = MemorySpec(kind="linear")
    x = torch.randn(1, 6, 2, 4, dtype=torch.float64)
    gates = [torch.rand(1, 6, 2, dtype=torch.float64) for _ in range(3)]
    st = init_state(spec, 1, 2, 4, dtype=torch.float64)
    want, _ = memory_chunk(x, x, x, *gates, state=st, spec=spec, chunk_size=4)
    got, _ = memory_op("adjoint", 2)(x, x, x, *gates, state=st, spec=spec, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _, open_state = memory_chunk(x[:, :2], x[:, :2], x[:, :2], *(g[:, :2] for g in gates), state=st, spec=spec,
                                 chunk_size=4)  # fmt: skip
    rest = (x[:, 2:], x[:, 2:], x[:, 2:], *(g[:, 2:] for g in gates))
    got, _ = memory_op("fused", 2)(*rest, state=open_state, spec=spec, chunk_size=4)
    torch.testing.assert_close(got, memory_chunk(*rest, state=open_state, spec=spec, chunk_size=4)[0], rtol=0, atol=0)


def test_gradcheck_through_the_inner_loops() -> None:
    """Outer gradients through every inner update (D7), w.r.t. the input and the initial memory states."""
    spec = MemorySpec(expansion=1)
    torch.manual_seed(0)
    layer = SelfModifyingTitans(8, 2, spec=spec, mem_chunk=2, proj_chunk=2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    init = [layer.proj_init.weights[0], layer.mem_init.weights[1]]

    def f(x, w_proj, w_mem):
        params = {"proj_init.weights.0": w_proj, "mem_init.weights.1": w_mem}
        return torch.func.functional_call(layer, params, (x,))[0]

    args = (x, *(w.detach().clone().requires_grad_() for w in init))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        SelfModifyingTitans(10, 3, spec=MemorySpec(), mem_chunk=4, proj_chunk=4)
    with pytest.raises(ValueError, match="proj_chunk must be a positive int"):
        SelfModifyingTitans(8, 2, spec=MemorySpec(), mem_chunk=4, proj_chunk=0)
    layer = build({})
    _, st = layer(torch.randn(2, 3, 16, dtype=torch.float64))
    other = st._replace(memory=st.proj)  # the projection stack's state where the main memory's belongs
    with pytest.raises(ValueError, match="another"):
        layer(torch.randn(2, 3, 16, dtype=torch.float64), other)


@pytest.mark.parametrize(("normalize_v", "bounded"), [(True, True), (False, False)])
def test_default_gates_stay_bounded(normalize_v: bool, bounded: bool) -> None:
    """Why values are normalised: with the step size at half its cap the unnormalised self-referential loop
    blows up (also at 0.9 of the cap; at 0.1, the initial value, both stay bounded)."""
    torch.manual_seed(0)
    layer = SelfModifyingTitans(64, 4, spec=MemorySpec(), mem_chunk=16, proj_chunk=16, normalize_v=normalize_v)
    with torch.no_grad():
        layer.readout_bias["eta"].fill_(0.0)  # sigmoid(0) = half the cap
        _, st = layer(torch.randn(2, 256, 64))
    size = max(w.abs().max().item() for w in st.proj.weights + st.memory.weights)
    assert (size < 10) == bounded, size


@pytest.mark.parametrize("flush", [True, False])
def test_long_cpu_run_leaves_no_subnormal_state(flush: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """At its retention gates the untrained layer forgets geometrically (at the initial alpha 0.99 its
    fast weights reach 1e-36 after 8K tokens); here alpha is 0.95 so 2,048 tokens suffice. Once the chunk's decay
    `alpha^C` exceeds 1/2 the smallest subnormals stay fixed (round to nearest), so without the flush of the
    memory op half of the carried state (projection and main memories) is subnormal; with it none is."""
    import nestlearn.ops.memory.common as common

    monkeypatch.setattr(common, "FLUSH_SUBNORMALS", flush)
    torch.manual_seed(0)
    layer = SelfModifyingTitans(16, 2, spec=MemorySpec(), mem_chunk=8, proj_chunk=8)
    with torch.no_grad():
        layer.readout_bias["alpha"].fill_(2.9444)  # sigmoid = 0.95
        _, st = layer(torch.randn(1, 2048, 16))
    tensors = [t for ms in (st.proj, st.memory) for t in ms.weights + ms.momenta]
    tiny = torch.finfo(torch.float32).tiny
    sub = sum(int(((t.abs() > 0) & (t.abs() < tiny)).sum()) for t in tensors) / sum(t.numel() for t in tensors)
    assert (sub == 0.0) == flush, sub


# ---------------------------------------------------------------------------------------------
# the compiled projection step


@pytest.fixture
def fresh_compiles() -> Iterator[None]:
    """No compiled step or dynamo cache from another test (each test counts its own compiles)."""
    self_modifying._compiled_step.cache_clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    self_modifying._compiled_step.cache_clear()
    torch._dynamo.reset()


def _two_calls(layer: SelfModifyingTitans, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs, states and every gradient of two calls across an open projection chunk (5 + 18 tokens)."""
    y1, st = layer(x[:, :5])
    y2, st = layer(x[:, 5:], st)
    states = [*st.proj.weights, *st.proj.momenta, *st.memory.weights]
    loss = (torch.cat([y1, y2], 1) * torch.cos(torch.arange(23.0, dtype=x.dtype))[:, None]).sum()
    loss = loss + sum((w * torch.sin(torch.arange(w.numel(), dtype=x.dtype)).view_as(w)).sum() for w in states)
    return [y1, y2, *states, *torch.autograd.grad(loss, list(layer.parameters()))]


@pytest.mark.parametrize("name", ["hope", "adaptive_q", "no_momentum", "no_weight_decay", "static_k"])
def test_compiled_step_gives_the_eager_results(
    name: str, fresh_compiles: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`compile_step` (traced by dynamo and AOTAutograd, no code generation: "aot_eager"), float64, C_proj = 3:
    the second call's first chunk finishes an open one and its last is short (both eager), the rest compiled,
    inside checkpointed segments with `save_every` 2, then without them (`save_every` 1): the eager loop's
    outputs, states and every gradient, from one graph for every compiled chunk of both runs. The graph is traced
    once, inside the checkpointed segments; the second run takes it without a recompile (each run was its own
    test case, tracing the same graph again)."""
    monkeypatch.setattr(self_modifying, "COMPILE_BACKEND", "aot_eager")
    compiled_chunks: list[object] = []  # the plans of the chunks that took the compiled step
    run_compiled = self_modifying._run_compiled
    monkeypatch.setattr(self_modifying, "_run_compiled",
                        lambda plan, *args: compiled_chunks.append(plan) or run_compiled(plan, *args))  # fmt: skip
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    for save_every in (2, 1):
        kw = dict(mem_chunk=4, proj_chunk=3, save_every=save_every)
        want = _two_calls(build(ABLATIONS[name], **kw), x)
        compiled_chunks.clear()
        got = _two_calls(build(ABLATIONS[name], compile_step=True, **kw), x)
        assert compiled_chunks and not set(compiled_chunks) & self_modifying._EAGER_PLANS, save_every
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, save_every


def test_compiled_step_only_where_it_trains(fresh_compiles: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No compile without gradients (evaluation, generation), for a `second_order` call (its gradient of a gradient,
    which a compiled backward cannot take) or inside an outer `torch.compile` (whose trace covers the loop: one graph,
    no break); the eager loop's results in each."""
    monkeypatch.setattr(self_modifying, "COMPILE_BACKEND", "aot_eager")
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    eager, compiled = build({}, mem_chunk=4, proj_chunk=4), build({}, mem_chunk=4, proj_chunk=4, compile_step=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], eager(x)[0], rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(compiled(xg, second_order=True)[0].square().sum(), xg, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), compiled.readout["eta"])
    (g0,) = torch.autograd.grad(eager(xg, second_order=True)[0].square().sum(), xg, create_graph=True)
    torch.testing.assert_close(gg, torch.autograd.grad(g0.square().sum(), eager.readout["eta"])[0], rtol=0, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    explained = torch._dynamo.explain(lambda t: compiled(t)[0])(xg)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_recompile_limit_falls_back_to_eager(fresh_compiles: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once torch refuses another compile (here its limit set to 1, then a second batch size), the step runs eagerly
    with a warning, with the eager results."""
    monkeypatch.setattr(self_modifying, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(self_modifying, "_EAGER_PLANS", set())
    eager, compiled = build({}, mem_chunk=4, proj_chunk=4), build({}, mem_chunk=4, proj_chunk=4, compile_step=True)
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    with torch._dynamo.config.patch(recompile_limit=1):
        torch.testing.assert_close(compiled(x[:2])[0], eager(x[:2])[0], rtol=0, atol=1e-12)
        with pytest.warns(UserWarning, match="recompile limit reached"):
            y = compiled(x)[0]
    torch.testing.assert_close(y, eager(x)[0], rtol=0, atol=1e-12)
    assert compiled.plan in self_modifying._EAGER_PLANS


def test_compiled_step_differentiates_twice(fresh_compiles: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """With online CMS levels the step's backward runs twice per segment (the inner gradient, then the outer loss),
    so its graph is kept (`retain_graph`): the second pass gives the first one's gradients. (torch 2.11 refused the
    second pass of a compiled backward that donated its saved buffers; the step turns donation off.)"""
    monkeypatch.setattr(self_modifying, "COMPILE_BACKEND", "aot_eager_decomp_partition")
    torch.manual_seed(0)
    layer = SelfModifyingTitans(16, 2, spec=MemorySpec(), mem_chunk=8, proj_chunk=4, impl="adjoint", compile_step=True)
    loss = layer(torch.randn(2, 16, 16))[0].square().sum()
    first = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(layer.parameters()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_compile_budget_keeps_less_for_the_backward(fresh_compiles: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile_budget` (AOTAutograd's activation memory budget; "aot_eager_decomp_partition" partitions as Inductor
    does, without code generation): at 0.05 the compiled step keeps less for the backward than the written-out
    backward ("adjoint") does, at 1 several times more (bytes through `saved_tensors_hooks`, one 256-token call at
    the 20M head shape; measured 42.0, 66.7 and 313.6 MiB), with the eager gradients (float32: within 1e-5 of each
    gradient's largest entry)."""
    monkeypatch.setattr(self_modifying, "COMPILE_BACKEND", "aot_eager_decomp_partition")
    x = torch.randn(2, 256, 256)
    kept, grads = {}, {}
    runs = (("eager", {}), ("1", {"compile_step": True}), ("0.05", {"compile_step": True, "compile_budget": 0.05}))
    for key, kw in runs:
        torch.manual_seed(0)
        layer = SelfModifyingTitans(256, 8, spec=MemorySpec(), mem_chunk=64, proj_chunk=64, impl="adjoint", **kw)
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _ = layer(x)
        kept[key] = sum(sizes)
        grads[key] = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    assert kept["0.05"] < kept["eager"] < kept["1"] / 3
    for key in ("1", "0.05"):  # float32, relative to each gradient's largest entry
        for a, b in zip(grads["eager"], grads[key], strict=True):
            assert float((b - a).abs().max()) <= 1e-5 * float(a.abs().max())


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_step_float32(backend: str, fresh_compiles: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the models train, float32, against the eager loop on `impl="adjoint"` (its update with autocast off, as
    the compiled step's): "inductor" (the default backend: generated C++ on the CPU, Triton on a GPU) gives the
    outputs, states and every gradient to float32 rounding. Under bf16 autocast ("aot_eager") the outputs and
    states agree to float32 rounding and the gradients within 3e-3 of their largest entry (measured 1.5e-3: the
    traced backward of the generation's bf16 products rounds otherwise; the eager "chunk" impl, whose update runs
    in bf16, is 1.2e-2 away)."""
    monkeypatch.setattr(self_modifying, "COMPILE_BACKEND", backend)
    x = torch.randn(2, 16, 16)
    results = []
    for compile_step in (False, True):
        torch.manual_seed(0)
        layer = SelfModifyingTitans(16, 2, spec=MemorySpec(), mem_chunk=8, proj_chunk=4, impl="adjoint",
                                    compile_step=compile_step)  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backend == "aot_eager"):
            y, st = layer(x)
        grads = torch.autograd.grad(y.float().square().sum(), list(layer.parameters()))
        results.append(([y, *st.proj.weights], grads))
    (outs, grads), (outs_c, grads_c) = results
    for a, b in zip(outs, outs_c, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, grads_c, strict=True):
        if backend == "inductor":
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        else:
            assert float((b - a).abs().max() / a.abs().max()) <= 3e-3


@pytest.mark.gpu
def test_compiled_step_on_the_gpu(fresh_compiles: None) -> None:
    """Inductor's Triton code for the step at the 20M head shape (8 heads of 32, 64-token chunks), float32, against
    the eager loop (on CUDA: the kernels for the update): outputs, states and every gradient within 1e-4 of each
    tensor's largest entry (the kernels' tf32x3 dots against cuBLAS's float32 products)."""
    x = torch.randn(2, 200, 256, device="cuda")
    results = []
    for compile_step in (False, True):
        torch.manual_seed(0)
        layer = SelfModifyingTitans(256, 8, spec=MemorySpec(), mem_chunk=64, proj_chunk=64, compile_step=compile_step)
        y, st = layer.cuda()(x)
        grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
        results.append([y, *st.proj.weights, *st.memory.weights, *grads])
    for a, b in zip(*results, strict=True):
        assert float((b - a).abs().max() / a.abs().max()) <= 1e-4
