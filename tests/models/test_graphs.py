"""`StepGraphs` (CUDA graphs of every block call of a training step) computes the eager model's training step: the
same losses and every parameter's gradient over several optimizer steps of two micro-batches (the graphs hold the
parameters' storage; gradients accumulate over replays), for every variant (static CMS levels) and with online
CMS levels learning inside the step (each captured backward replayed twice), under bf16 autocast too; the call
bookkeeping (flattened states, outputs rebuilt, tensors handed through) is checked on CPU with the capture replaced
by the call itself; the refusals name the fix."""

from __future__ import annotations

import pytest
import torch

from nestlearn.models import VARIANTS, ModelConfig
from nestlearn.models import graphs as graphs_module
from nestlearn.models.graphs import StepGraphs, check_graphable
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


def _compare(variant: str, over: dict, device: str, amp: bool, tol: dict) -> None:
    ids = torch.randint(0, 64, (4, 41), device=device, generator=torch.Generator(device).manual_seed(1))
    eager, graphed = small(variant, device, **over), small(variant, device, **over)
    graphs = StepGraphs(graphed)
    for a, b in zip(_steps(eager, ids, None, amp), _steps(graphed, ids, graphs, amp), strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, **tol)
    assert graphs.graphs, "no block call was captured"


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
@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize(("variant", "over"), ONLINE, ids=[v for v, _ in ONLINE])
def test_graphed_steps_with_online_levels_equal_eager_steps(variant: str, over: dict, amp: bool) -> None:
    """As above with online CMS levels learning inside the step: each captured call's backward is replayed twice
    (the segment's inner gradient, then the outer loss), so it must not free what its second replay reads."""
    tol = dict(rtol=2e-2, atol=1e-2) if amp else dict(rtol=1e-4, atol=1e-5)
    _compare(variant, over, "cuda", amp, tol)


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
    monkeypatch.setattr(graphs_module, "_graphed", lambda fn, samples, warmup, retain=False: fn)
    _compare(variant, over, "cpu", False, dict(rtol=0, atol=0))


def test_refusals_name_the_fix() -> None:
    with pytest.raises(ValueError, match="activation_checkpointing"):
        check_graphable(small("transformer", activation_checkpointing=True))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_graphable(small("transformer"))
