"""The model family: every variant trains, carries its state exactly, reaches every parameter with gradients,
generates while learning, honours the ablation switches, and refuses bad input with a clear message."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from nestlearn.models import VARIANTS, CausalLM, ModelConfig, preset
from nestlearn.models.block import memory_spec
from nestlearn.models.config import SLIDING_WINDOW, fields_for

SMALL = dict(mem_chunk=4, proj_chunk=3, segment=8, window=6, n_persistent=2)


def applicable(variant: str, fields: dict) -> dict:
    """The entries of one set of fields for all variants that apply to `variant`; their `window` is MAG / MAL's
    sliding window (full attention stays full)."""
    fields = fields_for(variant, fields)
    return fields if variant in SLIDING_WINDOW else {k: v for k, v in fields.items() if k != "window"}


def tiny(variant: str, **kw) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        variant=variant, vocab_size=64, d_model=16, n_layers=2, n_heads=2, mlp_hidden=24,
        **{**applicable(variant, SMALL), **kw},
    )  # fmt: skip
    return CausalLM(cfg).double()


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_reaches_every_parameter(variant: str) -> None:
    """Gradients of the LM loss reach every parameter: projections, gates, persistent tokens, initial memory states."""
    model = tiny(variant)
    ids = torch.randint(0, 64, (2, 21))
    loss, _ = model.loss(ids)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_pass_equals_pieces_equals_token_by_token(variant: str) -> None:
    """D12: the state carries everything; chunk and segment boundaries fall inside calls and between them."""
    model = tiny(variant)
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        logits, state = model(ids)
        for splits in ([7], [1, 4, 5, 13], list(range(1, 19))):
            outs, st = [], None
            for lo, hi in itertools.pairwise([0, *splits, 19]):
                out, st = model(ids[:, lo:hi], st)
                outs.append(out)
            torch.testing.assert_close(torch.cat(outs, 1), logits, rtol=0, atol=1e-10)
            assert st.position == state.position == 19


@pytest.mark.parametrize("variant", ["hope", "titans_mac"])
def test_checkpointing_changes_nothing(variant: str) -> None:
    """Activation checkpointing recomputes blocks: same loss, same gradients, same state fingerprint."""
    model = tiny(variant)
    ckpt = CausalLM(dataclasses.replace(model.config, activation_checkpointing=True)).double()
    ckpt.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 13))
    results = []
    for m in (model, ckpt):
        loss, st = m.loss(ids)
        results.append([loss.detach(), *torch.autograd.grad(loss, list(m.parameters()))])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert st.fingerprint == model.config.fingerprint()


@pytest.mark.parametrize("variant", ["hope", "titans_lmm"])
def test_naive_impl_gives_the_same_model(variant: str) -> None:
    model = tiny(variant)
    ref = CausalLM(dataclasses.replace(model.config, impl="naive")).double()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids)[0], model(ids)[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize(("impl", "save_every"), [("lean", 1), ("adjoint", 1), ("adjoint", 2), ("adjoint", 0)])
@pytest.mark.parametrize("variant", ["hope", "titans_mac"])
def test_memory_lean_impl_changes_nothing(variant: str, impl: str, save_every: int) -> None:
    """impl="lean" (memory-lean backward) and "adjoint" (the hand-derived backward, which takes HOPE's and the
    Titans variants' clipped memories), keeping every chunk start, every second or none
    (`memory_save_every`), give the chunk form's loss and every gradient, and carry state. The Titans memory's
    clip is set where it bites (0.05: at the default 3 no token of these inputs is clipped)."""
    model = tiny(variant, **({"inner_grad_clip": 0.05} if variant != "hope" else {}))
    lean = CausalLM(dataclasses.replace(model.config, impl=impl, memory_save_every=save_every)).double()
    lean.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 13))
    for m in (model, lean):
        m.loss(ids)[0].backward()
    for (name, p), q in zip(model.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-10, msg=name)
    with torch.no_grad():
        _, st = lean(ids[:, :5])
        torch.testing.assert_close(lean(ids[:, 5:], st)[0], model(ids)[0][:, 5:], rtol=0, atol=1e-10)


def test_memory_save_every_inside_activation_checkpointing() -> None:
    """The projection loop's checkpointed segments nested in the block's activation checkpointing: HOPE's
    gradients as without either."""
    model = tiny("hope")
    ids = torch.randint(0, 64, (2, 13))
    grads = []
    for extra in ({}, {"memory_save_every": 2, "activation_checkpointing": True}):
        m = CausalLM(dataclasses.replace(model.config, impl="adjoint", **extra)).double()
        m.load_state_dict(model.state_dict())
        m.loss(ids)[0].backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["hope", "titans_mac"])
def test_compiled_adjoint_impl_gives_the_eager_gradients(variant: str) -> None:
    """`torch.compile` (aot_eager: the tracing, without a C++ toolchain) of a model whose memories take the
    written-out backward (impl "adjoint", what "auto" takes on CUDA), static levels: the eager loss and gradients.
    It raised "view size is not compatible" in the compiled backward while the op's gradients kept their inputs'
    strides (HOPE's generated eta is a transposed view) where its fake implementation promised contiguous ones."""
    model = tiny(variant, **({"cms_online_layers": ()} if variant == "hope" else {}))
    model = CausalLM(dataclasses.replace(model.config, impl="adjoint")).double()
    ids = torch.randint(0, 64, (2, 13))
    grads = []
    for fn in (lambda x: model.loss(x)[0], torch.compile(lambda x: model.loss(x)[0], backend="aot_eager")):
        model.zero_grad()
        fn(ids).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_memory_lean_impl_takes_full_meta_gradients() -> None:
    """Full meta-gradients differentiate the memories twice: impl="lean" then runs the chunk form there."""
    kw = dict(cms_levels=(None, 4), cms_lr=(0.0, 0.1), cms_meta_grad="full")
    grads = []
    for impl in ("chunk", "lean"):
        model = tiny("hope", impl=impl, **kw)
        model.loss(torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3)))[0].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


ABLATIONS = {
    "dgd": False,
    "memory_momentum": False,
    "memory_decay": False,
    "adaptive_k": False,
    "adaptive_v": False,
    "adaptive_q": True,
    "cms": False,
}


@pytest.mark.parametrize("switch", sorted(ABLATIONS))
def test_ablation_switches_change_hope(switch: str) -> None:
    """Each Table 6 switch changes the computation (the layer tests check each against its reference)."""
    ids = torch.randint(0, 64, (2, 15))
    with torch.no_grad():
        base = tiny("hope")(ids)[0]
        other = tiny("hope", **{switch: ABLATIONS[switch]})(ids)[0]
    assert (base - other).abs().max() > 1e-6


def test_inner_grad_clip_reaches_the_titans_memories_only() -> None:
    """`inner_grad_clip` sets the plain-GD memories' clip (default 3, None = off); HOPE's DGD memories have none."""
    assert memory_spec(tiny("titans_mag").config, titans=True).max_grad_norm == 3.0
    assert memory_spec(tiny("hope").config, titans=False).max_grad_norm is None
    assert memory_spec(tiny("titans_lmm", inner_grad_clip=None).config, titans=True).max_grad_norm is None
    ids = torch.randint(0, 64, (1, 15))
    with torch.no_grad():
        base = tiny("titans_lmm")(ids)[0]
        tight = tiny("titans_lmm", inner_grad_clip=1e-3)(ids)[0]
    assert (base - tight).abs().max() > 1e-6


def test_generate_keeps_learning_and_matches_forward() -> None:
    """Greedy generation == argmax of a forward pass over prompt + generated tokens; the state has read them all."""
    model = tiny("hope")
    prompt = torch.randint(0, 64, (2, 9))
    new, state = model.generate(prompt, 6, temperature=0)
    full = torch.cat([prompt, new], 1)
    with torch.no_grad():
        logits, ref_state = model(full)
    torch.testing.assert_close(new, logits[:, 8:-1].argmax(-1))
    assert state.position == 15
    for a, b in zip(_tensors(state.blocks), _tensors(ref_state.blocks), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    sampled, _ = model.generate(prompt, 4, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 4) and int(sampled.max()) < 64


def test_reset_returns_to_the_meta_learned_state() -> None:
    model = tiny("hope")
    ids = torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        first, st = model(ids)
        again, _ = model(ids, model.init_state(1))
        carried, _ = model(ids, st)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert (carried - first).abs().max() > 1e-6  # the carried state remembers the first reading


def test_bad_input_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"unknown variant 'mamba'; choose one of"):
        ModelConfig(variant="mamba")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"not divisible by n_heads = 7; pick n_heads among"):
        ModelConfig(d_model=64, n_heads=7)
    with pytest.raises(ValueError, match="inner_grad_clip must be > 0 or None"):
        preset("debug", "titans_mag", inner_grad_clip=0)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("7B")
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"d_modle": 3})
    model, other = tiny("hope"), tiny("titans_lmm")
    ids = torch.randint(0, 64, (2, 5))
    _, st = other(ids)
    with pytest.raises(ValueError, match="another configuration"):
        model(ids, st)
    _, st = model(ids)
    with pytest.raises(ValueError, match="holds 2 sequences but input_ids has 1"):
        model(ids[:1], st)
    with pytest.raises(ValueError, match="integer tensor"):
        model(ids.float())
    limited = tiny("transformer", max_seq_len=8)
    _, st = limited(ids)
    with pytest.raises(ValueError, match="max_seq_len is 8"):
        limited(torch.randint(0, 64, (2, 4)), st)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, tuple | list):
        for item in tree:
            yield from _tensors(item)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["hope", "titans_mac", "transformer"])
def test_cuda_matches_cpu(variant: str) -> None:
    """float64 on CUDA == CPU to 1e-10; bf16 autocast (fast weights float32, D8) within 5e-2 relative RMS."""
    model = tiny(variant)
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        ref, _ = model(ids)
        cuda = model.cuda()
        got, _ = cuda(ids.cuda())
        torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-10)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low, _ = cuda.float()(ids.cuda())
    rel = ((low.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel <= 5e-2, rel


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant: str) -> None:
    """Changing token t changes no logit before t: nothing leaks from the future, inside chunks or segments."""
    model = tiny(variant)
    ids = torch.randint(0, 64, (1, 19))
    changed = ids.clone()
    changed[0, 11] = (ids[0, 11] + 1) % 64
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(b[:, :11], a[:, :11], rtol=0, atol=0)
    assert (b[:, 11:] - a[:, 11:]).abs().max() > 0
