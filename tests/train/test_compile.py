"""`compile=true`: a static model trains under `torch.compile` with the eager run's losses; every variant's forward
(static CMS levels) is one graph, no break, the MLP kernels' custom ops included; a model with online CMS levels is
refused with the fix, and the reason is pinned: compiled, the CMS levels' outer gradients differ from eager ones
(torch 2.13). When that test fails, torch.compile handles the inner gradient and the refusal can go."""

from __future__ import annotations

import pytest
import torch
import torch._functorch.config

from nestlearn.models import CausalLM, preset
from nestlearn.train import TrainConfig, train
from tests.train.helpers import TINY, losses


def test_compiled_training_gives_the_eager_losses(data, tmp_path) -> None:
    train(TrainConfig(data=str(data), out=str(tmp_path / "eager"), steps=3, **TINY))
    train(TrainConfig(data=str(data), out=str(tmp_path / "compiled"), steps=3, compile=True, **TINY))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, *_ in compiled] == [1, 2, 3]
    for (_, a, _), (_, b, _) in zip(eager, compiled, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)


@pytest.mark.parametrize(
    ("variant", "impl"),
    [("transformer", "auto"), ("hope_attention", "auto"), ("hope", "auto"), ("hope", "fused"),
     ("titans_lmm", "auto"), ("titans_lmm", "fused"), ("titans_mac", "auto"), ("titans_mag", "auto"),
     ("titans_mal", "auto")],
)  # fmt: skip
def test_every_variant_traces_to_one_graph(variant: str, impl: str) -> None:
    """Dynamo's view of a training forward and loss (static CMS levels): one graph, no break. "fused" takes the MLP
    memory's kernels (their custom ops): on the GPU where there is one (without one, Triton's interpreter on CPU;
    on a GPU machine the interpreter is off and the kernels refuse CPU tensors). The config's fingerprint, hashed
    inside `forward`, broke every call's graph before it was computed once per model (`CausalLM.fingerprint`)."""
    fields = {"impl": impl} if variant not in ("transformer", "hope_attention") else {}
    fields |= {"cms_online_layers": ()} if variant in ("hope", "hope_attention") else {}
    cfg = preset("debug", variant, n_layers=2, d_model=32, n_heads=2, **fields)
    torch.manual_seed(0)
    device = "cuda" if impl == "fused" and torch.cuda.is_available() else "cpu"
    model = CausalLM(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device=device)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids)[0]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_online_cms_levels_are_refused_with_the_fix(data, tmp_path) -> None:
    online = {**TINY, "variant": "hope_attention", "model_overrides": {**TINY["model_overrides"],
                                                                       "cms_levels": [None, 8, 4]}}  # fmt: skip
    with pytest.raises(ValueError, match=r"compile=true does not support online CMS levels.*cms_online_layers=\[\]"):
        train(TrainConfig(data=str(data), out=str(tmp_path), steps=1, compile=True, **online))


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    logits = model(ids)[0]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@torch._functorch.config.patch(donated_buffer=False)
def test_why_online_levels_are_refused() -> None:
    """Blocks compiled, buffer donation off (with it on the backward refuses to run twice): a static model's outer
    gradients agree with eager ones to 1e-5; with online levels they differ by far more (1.9e-3 at this size, up to
    108 % at the debug preset) although the online model is well conditioned (eager float32 against float64:
    1e-6, measured at both sizes). The config is patched by torch's own `patch`: pytest's monkeypatch deletes the
    entry on undo (it is not in the module's `__dict__`), which hides it and breaks every later compile."""
    worst = {}
    for online in (True, False):
        cfg = preset("debug", "hope_attention", n_layers=2, d_model=32, n_heads=2, mlp_hidden=48,
                     cms_levels=(None, 16, 8), **({} if online else {"cms_online_layers": ()}))  # fmt: skip
        torch.manual_seed(0)
        model = CausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (2, 32))
        eager = _grads(model, ids)
        model.zero_grad()
        for block in model.blocks:
            block.compile()
        compiled = _grads(model, ids)
        worst[online] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in
                            zip(compiled, eager, strict=True))  # fmt: skip
    assert worst[False] <= 1e-5
    assert worst[True] > 1e-4, f"compiled online CMS gradients now agree ({worst[True]:.1e}): lift the refusal"
