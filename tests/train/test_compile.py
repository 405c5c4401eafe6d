"""`compile=true`: static and online-CMS models train under `torch.compile` with the eager run's losses; every
variant's forward (static CMS levels) is one graph, no break, the MLP kernels' custom ops included; with online
levels the inner gradient, the levels' outer gradients and every other one equal eager ones, blocks compiled or the
whole model (it was refused until the driver gave the blocks their first fast weights from outside their graphs)."""

from __future__ import annotations

import pytest
import torch
import torch._functorch.config

from nestlearn.models import CausalLM, preset
from nestlearn.train import TrainConfig, train
from tests.train.helpers import TINY, losses


def test_compiled_training_gives_the_eager_losses(data, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile=true` on a static model: the run's model goes through `torch.compile` (once, and not without the
    flag; Inductor, the default backend: the one whole-model training run it compiles in the CPU suite) and
    trains with the eager losses."""
    compiled_models: list[str] = []
    real = torch.compile

    def spy(model: torch.nn.Module, **kwargs: object) -> object:
        compiled_models.append(type(model).__name__)
        return real(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    train(TrainConfig(data=str(data), out=str(tmp_path / "eager"), steps=3, **TINY))
    assert compiled_models == []
    train(TrainConfig(data=str(data), out=str(tmp_path / "compiled"), steps=3, compile=True, **TINY))
    assert compiled_models == ["CausalLM"]
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


# 24 tokens in segments of 8: three learned segments a sequence, so a compiled backward runs more than once a step;
# the evaluation after the last step reads its 4 windows as one batch of the training's size (with 2 windows the
# compiled model traced every graph again for a dynamic batch: 8 s of the test's 28)
ONLINE = {**TINY, "variant": "hope_attention", "seq_len": 24, "eval_windows": 4,
          "model_overrides": {**TINY["model_overrides"], "n_layers": 1, "cms_levels": [None, 16, 8]}}  # fmt: skip


def test_compiled_online_training_gives_the_eager_losses(data, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile=true` with online CMS levels (`train.loop.prepare_compile` turns buffer donation off for the run,
    without which a compiled backward's second call is refused: this test then fails), with the "aot_eager"
    backend to keep Inductor's compile out of the CPU suite. The losses move too little to show a zero inner
    gradient in the first segment: `test_compiled_online_levels_get_the_eager_gradients` pins that."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="aot_eager"))
    with torch._functorch.config.patch(donated_buffer=True):  # the default, which `prepare_compile` turns off
        train(TrainConfig(data=str(data), out=str(tmp_path / "eager"), steps=1, **ONLINE))
        train(TrainConfig(data=str(data), out=str(tmp_path / "compiled"), steps=1, compile=True, **ONLINE))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, *_ in compiled] == [1]
    for (_, a, val_a), (_, b, val_b) in zip(eager, compiled, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)
        assert val_a is not None and val_b is not None and abs(val_a - val_b) <= 1e-4 * abs(val_a)  # compiled eval


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    logits = model(ids)[0]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_compile_refuses_online_levels_with_the_full_meta_gradient(data, tmp_path) -> None:
    """A compiled backward cannot be differentiated again: refused with the fix, not a torch-internal error."""
    full = {**ONLINE, "model_overrides": {**ONLINE["model_overrides"], "cms_meta_grad": "full"}}
    with pytest.raises(ValueError, match=r"cms_meta_grad=full.*compile=false"):
        train(TrainConfig(data=str(data), out=str(tmp_path), steps=1, compile=True, **full))


@torch._functorch.config.patch(donated_buffer=False)
@pytest.mark.parametrize("whole", [False, True], ids=["blocks", "model"])
def test_compiled_online_levels_get_the_eager_gradients(whole: bool) -> None:
    """Buffer donation off (as `prepare_compile` sets it; with it on the backward refuses to run twice), the blocks
    or the whole model compiled ("aot_eager": the traced graphs, no code generation): every outer gradient equals
    the eager one, online levels or static. Until the online driver built the blocks' first fast weights outside
    their graphs (and broke the model's graph there), the first segment's inner gradient came out zero compiled:
    the fast weights a graph makes are new tensors the loss does not depend on; the levels' outer gradients were
    then off by 2.4e-3 here (both ways; 1.9e-3 at 32 tokens, whose fourth segment added only time), up to 108 % at
    the debug preset. The config is patched by torch's own `patch`:
    pytest's monkeypatch deletes the entry on undo (it is not in the module's `__dict__`), which hides it and
    breaks every later compile."""
    for online in (True, False) if not whole else (True,):  # a static model's whole compile: the tests above
        cfg = preset("debug", "hope_attention", n_layers=2, d_model=32, n_heads=2, mlp_hidden=48,
                     cms_levels=(None, 16, 8), **({} if online else {"cms_online_layers": ()}))  # fmt: skip
        torch.manual_seed(0)
        model = CausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (2, 24))  # three segments of 8, as `ONLINE`'s
        eager = _grads(model, ids)
        model.zero_grad()
        torch._dynamo.reset()
        if whole:
            compiled = _grads(torch.compile(model, backend="aot_eager"), ids)
        else:
            for block in model.blocks:
                block.compile(backend="aot_eager")
            compiled = _grads(model, ids)
        worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in
                    zip(compiled, eager, strict=True))  # fmt: skip
        assert worst <= 1e-5, (online, worst)
