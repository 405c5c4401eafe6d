"""Online CMS learning in the language model (D10): the task loss drives the levels segment by segment, the
state carries everything (one pass == pieces == token by token, save / load mid-segment), sequences stay
independent, the update equals a hand-computed gradient step, `full` meta-gradients are exact, and a model that
reads a document twice predicts it better the second time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nestlearn.models import CausalLM, ModelConfig, load_state, save_state
from nestlearn.models.config import fields_for

VARIANTS = ["hope_attention", "hope"]


def online_model(variant: str = "hope_attention", **kw) -> CausalLM:
    torch.manual_seed(0)
    memory = fields_for(variant, dict(mem_chunk=4, proj_chunk=3))
    base = dict(variant=variant, vocab_size=64, d_model=16, n_layers=2, n_heads=2, mlp_hidden=24,
                cms_levels=(None, 8, 4), cms_lr=0.5, **memory)  # fmt: skip
    return CausalLM(ModelConfig(**{**base, **kw})).double()


def same_weights(model: CausalLM, **changes) -> CausalLM:
    """A model of another config (no new parameters) holding `model`'s parameters."""
    other = CausalLM(dataclasses.replace(model.config, **changes)).double()
    other.load_state_dict(model.state_dict())
    return other


def cms_states(state) -> list[torch.Tensor]:
    return [w for block in state.blocks for lv in block.cms.levels if lv is not None for w in lv.weights + lv.grads]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cms_variant", ["chain", "nested", "independent"])
def test_one_pass_equals_pieces_equals_token_by_token(variant: str, cms_variant: str) -> None:
    """Calls that end mid-segment keep the segment pending and the call that completes it learns from all of it."""
    model = online_model(variant, cms_variant=cms_variant)
    ids = torch.randint(0, 64, (2, 29))
    with torch.no_grad():
        full, st_full = model(ids)
        outs, st = [], None
        for lo, hi in [(0, 3), (3, 9), (9, 10), (10, 22), (22, 29)]:
            o, st = model(ids[:, lo:hi], st)
            outs.append(o)
        step, st_tok = [], None
        for t in range(29):
            o, st_tok = model(ids[:, t : t + 1], st_tok)
            step.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat(step, 1), full, rtol=0, atol=1e-10)
    for a, b, c in zip(cms_states(st_full), cms_states(st), cms_states(st_tok), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
        torch.testing.assert_close(c, a, rtol=0, atol=1e-10)
    static, _ = same_weights(model, cms_online_layers=())(ids)
    assert (static - full).abs().max() > 1e-4  # the online levels changed the computation


def test_a_level_whose_chunk_is_not_reached_is_a_static_mlp() -> None:
    """C_l >= T: no update inside the sequence, so the logits equal those of the static level; C_l = T updates
    the state at the very end only."""
    model = online_model(cms_levels=(None, 12), cms_lr=(0.0, 0.5))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        online, st = model(ids)
        static, _ = same_weights(model, cms_levels=(None, None))(ids)
    torch.testing.assert_close(online, static, rtol=0, atol=0)
    assert (st.blocks[0].cms.levels[1].weights[0] - model.blocks[0].mlp.levels[1].gate.weight).abs().max() > 0


def test_updates_happen_exactly_at_multiples_of_the_chunk() -> None:
    model = online_model(cms_levels=(None, 6, 3), cms_lr=0.5)
    ids = torch.randint(0, 64, (1, 14))
    changed = {1: [], 2: []}
    with torch.no_grad():
        st = model.init_state(1)
        for t in range(14):
            _, new = model(ids[:, t : t + 1], st)
            for lvl in (1, 2):
                before, after = st.blocks[1].cms.levels[lvl].weights[0], new.blocks[1].cms.levels[lvl].weights[0]
                if not torch.equal(before, after):
                    changed[lvl].append(t + 1)  # tokens read when it changed
            st = new
    assert changed == {1: [6, 12], 2: [3, 6, 9, 12]}


def test_update_is_the_gradient_of_the_segment_loss() -> None:
    """After C tokens a one-level model's fast weights equal `W_0 - lr * grad` of the summed next-token loss over
    the pairs inside the segment, computed by autograd on the static model with the same parameters."""
    model = online_model(cms_levels=(8,), cms_lr=0.3, n_layers=1)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        _, st = model(ids)
    static = same_weights(model, cms_online_layers=())
    logits, _ = static(ids)
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    lv = static.blocks[0].mlp.levels[0]
    grads = torch.autograd.grad(loss, [lv.gate.weight, lv.up.weight, lv.down.weight])
    for w, p, g in zip(st.blocks[0].cms.levels[0].weights, (lv.gate, lv.up, lv.down), grads, strict=True):
        torch.testing.assert_close(w[0], p.weight - 0.3 * g, rtol=0, atol=1e-12)


def test_sequences_are_independent() -> None:
    model = online_model()
    ids = torch.randint(0, 64, (3, 17))
    with torch.no_grad():
        together, st = model(ids)
        for b in range(3):
            alone, st_b = model(ids[b : b + 1])
            torch.testing.assert_close(alone[0], together[b], rtol=0, atol=1e-12)
            for a, s in zip(cms_states(st_b), cms_states(st), strict=True):
                torch.testing.assert_close(a[0], s[b], rtol=0, atol=1e-12)


def test_only_the_configured_layers_learn_online() -> None:
    model = online_model(n_layers=3, cms_online_layers=(2,))
    assert [b.mlp.online_levels for b in model.blocks] == [(), (), (1, 2)]
    with torch.no_grad():
        _, st = model(torch.randint(0, 64, (1, 9)))
    assert st.blocks[0].cms.levels == (None, None, None) and st.blocks[2].cms.levels[1] is not None


def test_outer_gradients_reach_initial_weights_and_rates() -> None:
    """Training through the online updates: the loss's gradient reaches every level and the learnable rates."""
    model = online_model(cms_learn_lr=True)
    loss, _ = model.loss(torch.randint(0, 64, (2, 17)))
    loss.backward()
    for b in model.blocks:
        assert b.mlp.log_lr.grad[1:].abs().min() > 0  # both online levels updated inside the sequence
        for lv in b.mlp.levels:
            assert lv.gate.weight.grad.abs().max() > 0


def _loss_of_cms_params(model: CausalLM, ids: torch.Tensor):
    names = [n for n, _ in model.named_parameters() if ".mlp.levels." in n]
    params = dict(model.named_parameters())

    def f(*ws: torch.Tensor) -> torch.Tensor:
        out, _ = torch.func.functional_call(model, {**params, **dict(zip(names, ws, strict=True))}, (ids,))
        return out.sum()

    return f, tuple(params[n].detach().clone().requires_grad_() for n in names)


def test_full_meta_gradient_is_exact_and_differs_from_first_order() -> None:
    """`full` passes gradcheck through two online updates; `first_order` gives a different (approximate) gradient."""
    kw = dict(vocab_size=7, d_model=4, n_heads=2, mlp_hidden=3, n_layers=1, cms_levels=(2,), cms_lr=0.7)
    ids = torch.randint(0, 7, (1, 5))
    full = online_model(cms_meta_grad="full", **kw)
    f, ws = _loss_of_cms_params(full, ids)
    assert torch.autograd.gradcheck(f, ws, eps=1e-6, atol=1e-7, rtol=1e-5)
    first = same_weights(full, cms_meta_grad="first_order")
    g_full = torch.autograd.grad(f(*ws), ws)
    g_first = torch.autograd.grad(_loss_of_cms_params(first, ids)[0](*ws), ws)
    assert max((a - b).abs().max() for a, b in zip(g_full, g_first, strict=True)) > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_reading_a_document_again_lowers_its_loss_only_when_online(variant: str) -> None:
    """Test-time learning: after reading a document and `forget_context` (the mixers start afresh, the CMS keeps
    what it learned), each new reading of it has a lower loss; with the online levels off every reading has
    exactly the same loss. (init_std 0.1 so that the untrained tiny model's MLPs matter; measured: 4.29, 3.83,
    3.52 for Hope-Attention.)"""
    doc = torch.randint(0, 64, (1, 32))
    for online in (True, False):
        model = online_model(variant, cms_levels=(None, 8), cms_lr=(0.0, 0.1), init_std=0.1)
        if not online:
            model = same_weights(model, cms_online_layers=())
        losses, state = [], None
        with torch.no_grad():
            for _ in range(3):
                loss, state = model.loss(doc, state)
                losses.append(float(loss))
                state = model.forget_context(state)
        if online:
            assert losses[1] < losses[0] - 0.2 and losses[2] < losses[1] - 0.1, losses
        else:
            assert losses[0] == losses[1] == losses[2], losses


def test_save_load_mid_segment_then_continue(tmp_path) -> None:
    model = online_model()
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        full, _ = model(ids)
        _, st = model(ids[:, :11])  # mid-segment: 3 tokens pending
        assert st.pending is not None and st.pending.tokens.shape == (2, 3)
        save_state(st, tmp_path)
        fresh = same_weights(model)
        out, _ = fresh(ids[:, 11:], load_state(tmp_path, fresh))
    torch.testing.assert_close(out, full[:, 11:], rtol=0, atol=1e-10)


def test_reading_without_learning() -> None:
    """`learn=False` changes no CMS weight; the segment it touched is skipped and learning resumes after it."""
    model = online_model(cms_levels=(None, 4), cms_lr=(0.0, 0.5))
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        _, st = model(ids[:, :2])
        _, st = model(ids[:, 2:6], st, learn=False)  # ends at a boundary: no update from tokens 0-3
        first = model.init_state(1).blocks[0].cms.levels[1].weights[0]
        assert torch.equal(st.blocks[0].cms.levels[1].weights[0], first)
        _, st = model(ids[:, 6:], st)
        assert not torch.equal(st.blocks[0].cms.levels[1].weights[0], first)
        new, st2 = model.generate(ids[:, :5], 6, temperature=0, learn_generated=False)
    assert new.shape == (1, 6) and st2.pending is None


def test_learn_accepts_ids_and_text() -> None:
    model = online_model()

    class Chars:
        def encode(self, text: str) -> list[int]:
            return [ord(c) % 64 for c in text]

    a = model.learn("a short document", tokenizer=Chars())
    b = model.learn(torch.tensor(Chars().encode("a short document")))
    assert a.position == b.position == 16
    with pytest.raises(ValueError, match="no tokenizer"):
        model.learn("text")


def test_inference_mode_is_refused_with_the_fix() -> None:
    model = online_model()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"use torch\.no_grad"):
        model(torch.randint(0, 64, (1, 9)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(cms_levels=()), "at least one level"),
        (dict(cms_levels=(None, 0)), "positive ints or None"),
        (dict(cms_online_layers=(5,)), "block indices run from 0 to 1"),
        (dict(cms_meta_grad="second"), "cms_meta_grad: expected one of 'first_order', 'full'"),
        (dict(cms_lr=(0.1,)), "one CMS learning rate per level"),
    ],
)
def test_bad_cms_config_names_the_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        online_model(**kwargs)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    """An online model in float64 on CUDA == CPU to 1e-10 (outputs and learned fast weights)."""
    model = online_model()
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        ref, st_ref = model(ids)
        got, st = model.cuda()(ids.cuda())
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-10)
    for a, b in zip(cms_states(st), cms_states(st_ref), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-10)
