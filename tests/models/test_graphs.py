"""`StepGraphs` (CUDA graphs of every block call of a training step) computes the eager model's training step: the
same losses and every parameter's gradient over several optimizer steps of two micro-batches (the graphs hold the
parameters' storage; gradients accumulate over replays), for every variant (static CMS levels) and with online
CMS levels learning inside the step (each captured call differentiated twice: the inner gradient through a backward
graph without the parameters' gradients, then the outer loss through the full one), under bf16 autocast too; the call
bookkeeping (flattened states, outputs rebuilt, tensors handed through) is checked on CPU with the capture replaced
by the call itself; the refusals name the fix. `DecodeGraphs` (one-token decoding) generates the eager tokens and
states for every variant, with online CMS levels learning between replays, and replays only calls whose key
repeats (never a growing attention cache); its bookkeeping is checked on CPU with a stand-in capture."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._pytree import tree_flatten

from nestlearn.models import VARIANTS, ModelConfig
from nestlearn.models import graphs as graphs_module
from nestlearn.models.graphs import DecodeGraphs, StepGraphs, check_graphable
from nestlearn.models.lm import CausalLM

from .test_lm import SMALL, applicable

LEARNING = {"cms_levels": (None, 16, 8)}  # online levels that update inside the test's 40 tokens (segments of 8)
STATIC = {"cms_online_layers": ()}
CASES = [(v, STATIC if v in ("hope", "hope_attention") else {}) for v in VARIANTS]
ONLINE = [("hope_attention", LEARNING), ("hope", LEARNING)]


def small(variant: str, device: str = "cpu", **kw) -> CausalLM:
    torch.manual_seed(0)
    over = {**applicable(variant, SMALL), **kw}
    cfg = ModelConfig(variant=variant, vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_hidden=48, **over)
    return CausalLM(cfg).to(device)


def _steps(model: CausalLM, ids: torch.Tensor, graphs: StepGraphs | None, amp: bool) -> list[list[torch.Tensor]]:
    """Three SGD steps of two micro-batches each (gradients accumulate over two backward passes)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for _ in range(3):
        losses = []
        for micro in ids.chunk(2):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = graphs.logits(micro[:, :-1]) if graphs is not None else model(micro[:, :-1])[0]
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten())
            loss.backward()
            losses.append(loss.detach().clone())
        out.append(losses + [p.grad.clone() for p in model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _compare(variant: str, over: dict, device: str, amp: bool, tol: dict) -> StepGraphs:
    ids = torch.randint(0, 64, (4, 41), device=device, generator=torch.Generator(device).manual_seed(1))
    eager, graphed = small(variant, device, **over), small(variant, device, **over)
    graphs = StepGraphs(graphed)
    for a, b in zip(_steps(eager, ids, None, amp), _steps(graphed, ids, graphs, amp), strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, **tol)
    assert graphs.graphs, "no block call was captured"
    return graphs


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize(("variant", "over"), CASES, ids=[v for v, _ in CASES])
def test_graphed_steps_equal_eager_steps(variant: str, over: dict, amp: bool) -> None:
    """Three SGD steps with the block calls replayed == three eager steps (two micro-batches each, so gradients
    accumulate over two replays of each graph): losses and every gradient. float32:
    1e-4 relative; bf16 autocast: 2e-2 relative, 1e-2 absolute (capture may pick other cuBLAS kernels, whose
    bf16 roundings differ)."""
    tol = dict(rtol=2e-2, atol=1e-2) if amp else dict(rtol=1e-4, atol=1e-5)
    _compare(variant, over, "cuda", amp, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize(("variant", "over"), ONLINE, ids=[v for v, _ in ONLINE])
def test_graphed_steps_with_online_levels_equal_eager_steps(variant: str, over: dict, amp: bool) -> None:
    """As above with online CMS levels learning inside the step: each captured call's backward is replayed twice
    (the segment's inner gradient, then the outer loss), so it must not free what its second replay reads."""
    tol = dict(rtol=2e-2, atol=1e-2) if amp else dict(rtol=1e-4, atol=1e-5)
    graphs = _compare(variant, over, "cuda", amp, tol)
    counts = [graphed.counts for _, graphed in graphs.graphs.values()]
    # the inner gradients took the backward without the parameters' gradients, every outer one the full one
    assert sum(c["inputs-only backward"] for c in counts) > 0 and all(c["backward"] > 0 for c in counts), counts


@pytest.mark.gpu
def test_evaluation_and_other_shapes_run_eagerly() -> None:
    model = small("titans_lmm", "cuda")
    graphs = StepGraphs(model)
    ids = torch.randint(0, 64, (3, 16), device="cuda")
    graphs.logits(ids)
    with torch.no_grad():
        torch.testing.assert_close(graphs.logits(ids[:2, :9]), model(ids[:2, :9])[0])
    assert len(graphs.graphs) == 2  # one per block call of the one training step


@pytest.mark.parametrize(("variant", "over"), [("hope", STATIC), ("titans_mac", {}), ("hope_attention", LEARNING)])
def test_flattened_calls_equal_eager_calls_on_cpu(variant: str, over: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bookkeeping around each capture (state flattened to tensors, outputs rebuilt, tensors handed through
    kept, one entry per call of a step) with the capture replaced by the call itself: exact in float32."""
    monkeypatch.setattr(graphs_module, "check_graphable", lambda model: None)
    seen: set[bool] = set()  # inputs_only() as each call's backward saw it

    def stand_in(fn, samples, warmup, retain, params, inputs_only=None):
        assert (inputs_only is not None) == retain  # an inputs-only backward only where backward runs twice

        class Spy(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *tensors):
                return tuple(t.view_as(t) for t in tensors)

            @staticmethod
            def backward(ctx, *grads):
                if inputs_only is not None:
                    seen.add(inputs_only())
                return grads

        return lambda *tensors: fn(*Spy.apply(*tensors))

    monkeypatch.setattr(graphs_module, "_graphed", stand_in)
    _compare(variant, over, "cpu", False, dict(rtol=0, atol=0))
    # with online levels the inner gradient's backward is told it may skip the parameters, the outer one is not
    assert seen == ({True, False} if "cms_levels" in over else set()), seen


def test_refusals_name_the_fix() -> None:
    with pytest.raises(ValueError, match="activation_checkpointing"):
        check_graphable(small("transformer", activation_checkpointing=True))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_graphable(small("transformer"))


def _decode(model: CausalLM, graphs: bool, steps: int = 40) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """Greedy tokens after a 12-token prompt, the final state's tensors, and the graphs' counts."""
    prompt = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(model.device)
    counts: dict = {}
    with DecodeGraphs(model) if graphs else contextlib.nullcontext() as g:
        tokens, state = model.generate(prompt, steps, temperature=0.0)
        counts = dict(g.counts) if g is not None else {}
    leaves = [t for t in tree_flatten(state.blocks)[0] if isinstance(t, torch.Tensor)]
    return tokens, leaves, counts


def _replays_expected(variant: str) -> bool:
    """Only the purely recurrent variants repeat their keys: attention states (the caches, MAG / MAL's windows,
    MAC's segments) carry the absolute position, a non-tensor leaf that is new at every token."""
    return variant in ("titans_lmm", "hope")


@pytest.mark.gpu
@pytest.mark.parametrize(("variant", "over"), CASES + ONLINE, ids=[v for v, _ in CASES] + ["hope_attention_online",
                                                                                          "hope_online"])  # fmt: skip
def test_decode_graphs_generate_the_eager_tokens(variant: str, over: dict) -> None:
    model = small(variant, "cuda", **over).eval()
    tokens, state, _ = _decode(model, False)
    tokens_g, state_g, counts = _decode(model, True)
    assert torch.equal(tokens, tokens_g)
    for a, b in zip(state, state_g, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (counts["replayed"] > 0) == _replays_expected(variant), counts
    assert (counts["learning replayed"] > 0) == (variant == "hope" and over is LEARNING), counts


class _CallGraph:
    """Stands in for a captured graph on CPU: a replay runs the call on the static inputs into the static outputs."""

    def __init__(self, flat, static_in: list[torch.Tensor], static_out: tuple[torch.Tensor, ...]) -> None:
        self.flat, self.static_in, self.static_out = flat, static_in, static_out

    def replay(self) -> None:
        with torch.no_grad():
            for o, n in zip(self.static_out, self.flat(*self.static_in), strict=True):
                o.copy_(n)


@pytest.mark.parametrize("variant", ["hope", "titans_lmm", "transformer", "titans_mag", "hope_online"])
def test_decode_bookkeeping_on_cpu(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys, capture at a key's second sighting, outputs rebuilt and copied out, with the capture replaced by a
    stand-in that reruns the call: exact in float32, and replays only where keys repeat. With online levels the
    learning step's calls (every 8 tokens here) go through the same bookkeeping, their stand-in the call itself."""

    def capture(self, block, leaves, spec, slots, tensors):
        flat = graphs_module._FlatCall(block, leaves, spec, slots)
        static_in = [t.detach().clone() for t in tensors]
        static_out = flat(*static_in)
        return flat, _CallGraph(flat, static_in, static_out), static_in, static_out

    monkeypatch.setattr(DecodeGraphs, "_new_pool", lambda self: None)
    monkeypatch.setattr(DecodeGraphs, "_capture", capture)
    monkeypatch.setattr(graphs_module, "_graphed", lambda fn, samples, warmup, retain, params, **kw: fn)
    online, variant = variant.endswith("_online"), variant.removesuffix("_online")
    model = small(variant, **(LEARNING if online else STATIC if variant == "hope" else {})).eval()
    steps = 40 if online else 24  # the learning step's keys repeat every third segment (3-token memory chunks)
    tokens, state, _ = _decode(model, False, steps=steps)
    tokens_g, state_g, counts = _decode(model, True, steps=steps)
    assert torch.equal(tokens, tokens_g)
    for a, b in zip(state, state_g, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert (counts["replayed"] > 0) == _replays_expected(variant), counts
    assert (counts["learning replayed"] > 0) == online, counts
    assert model.block_runner is None and not model.inner_only  # given back on exit


def test_decode_graphs_refuse_a_cpu_model() -> None:
    model = small("hope")
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device.*--cuda-graphs"):
        DecodeGraphs(model)
    assert model.block_runner is None
