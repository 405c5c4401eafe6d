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
    """Calls that end inside a segment, or at its end before the token after it, keep the segment pending; the
    call that completes it and reads that token learns from all of it (segments of 4 tokens here)."""
    model = online_model(variant, cms_variant=cms_variant)
    ids = torch.randint(0, 64, (2, 29))
    cuts = ([(0, 3), (3, 9), (9, 10), (10, 22), (22, 29)], [(0, 4), (4, 5), (5, 8), (8, 16), (16, 29)])
    with torch.no_grad():
        full, st_full = model(ids)
        pieces = []
        for cut in cuts:
            outs, st = [], None
            for lo, hi in cut:
                o, st = model(ids[:, lo:hi], st)
                assert (st.pending.tokens.shape[1] == 4) == (hi % 4 == 0)  # a completed segment waits
                outs.append(o)
            pieces.append((torch.cat(outs, 1), st))
        step, st_tok = [], None
        for t in range(29):
            o, st_tok = model(ids[:, t : t + 1], st_tok)
            step.append(o)
        pieces.append((torch.cat(step, 1), st_tok))
    for out, st in pieces:
        torch.testing.assert_close(out, full, rtol=0, atol=1e-10)
        for a, b in zip(cms_states(st_full), cms_states(st), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    static, _ = same_weights(model, cms_online_layers=())(ids)
    assert (static - full).abs().max() > 1e-4  # the online levels changed the computation


def test_a_level_whose_chunk_is_not_reached_is_a_static_mlp() -> None:
    """C_l >= T: no update inside the sequence, so the logits equal those of the static level; with C_l = T the
    update waits for token T + 1 (the target of the last prediction) and changes the state when it is read."""
    model = online_model(cms_levels=(None, 12), cms_lr=(0.0, 0.5))
    ids = torch.randint(0, 64, (2, 13))
    initial = model.blocks[0].mlp.levels[1].gate.weight
    with torch.no_grad():
        online, st = model(ids[:, :12])
        static = same_weights(model, cms_levels=(None, None))
        assert st.pending.tokens.shape == (2, 12) and torch.equal(st.blocks[0].cms.levels[1].weights[0][0], initial)
        after, st = model(ids[:, 12:], st)
        torch.testing.assert_close(online, static(ids[:, :12])[0], rtol=0, atol=0)
        assert (after[:, 0] - static(ids)[0][:, 12]).abs().max() > 1e-6
    assert (st.blocks[0].cms.levels[1].weights[0] - initial).abs().max() > 0


def test_updates_happen_exactly_at_multiples_of_the_chunk() -> None:
    """Level l updates after `k * C_l` tokens; read token by token, the update is made when token `k * C_l + 1`
    (the target of the chunk's last prediction) is read, before that token is processed."""
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
    assert changed == {1: [7, 13], 2: [4, 7, 10, 13]}


@pytest.mark.parametrize("after", [True, False])
def test_update_is_the_gradient_of_the_segment_loss(after: bool) -> None:
    """After the C tokens of a chunk and the token after it, a one-level model's fast weights equal
    `W_0 - lr * grad` of the summed next-token loss over the chunk's C predictions (the last one's target is the
    token after the chunk), computed by autograd on the static model with the same parameters. Without that
    token (`forget_context` ends the context) the update uses the C - 1 pairs inside the chunk."""
    model = online_model(cms_levels=(8,), cms_lr=0.3, n_layers=1)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        _, st = model(ids if after else ids[:, :8])
        st = st if after else model.forget_context(st)
    static = same_weights(model, cms_online_layers=())
    logits, _ = static(ids)
    n = 8 if after else 7
    loss = F.cross_entropy(logits[0, :n], ids[0, 1 : n + 1], reduction="sum")
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


@pytest.mark.parametrize("meta", ["first_order", "full"])
def test_outer_gradients_of_one_pass_equal_those_of_pieces(meta: str) -> None:
    """Training through calls that end at a segment end (the update waiting for the next call's first token) or
    inside one gives the one-pass gradients (measured: 2e-14 of gradients up to 40)."""
    model = online_model(cms_meta_grad=meta, cms_learn_lr=True)
    ids, w = torch.randint(0, 64, (2, 21)), torch.randn(2, 21, 64, dtype=torch.float64)
    params = list(model.parameters())
    one = torch.autograd.grad((model(ids)[0] * w).sum(), params, allow_unused=True)
    outs, st = [], None
    for lo, hi in [(0, 4), (4, 5), (5, 8), (8, 16), (16, 21)]:
        o, st = model(ids[:, lo:hi], st)
        outs.append(o)
    pieces = torch.autograd.grad((torch.cat(outs, 1) * w).sum(), params, allow_unused=True)
    for a, b in zip(one, pieces, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


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


@pytest.mark.parametrize("cut", [11, 12])
def test_save_load_mid_segment_then_continue(tmp_path, cut: int) -> None:
    """Saved inside a segment (11: 3 tokens pending) or at its end (12: the whole segment waits for token 13)."""
    model = online_model()
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        full, _ = model(ids)
        _, st = model(ids[:, :cut])
        assert st.pending is not None and st.pending.tokens.shape == (2, 3 if cut == 11 else 4)
        save_state(st, tmp_path)
        fresh = same_weights(model)
        out, _ = fresh(ids[:, cut:], load_state(tmp_path, fresh))
    torch.testing.assert_close(out, full[:, cut:], rtol=0, atol=1e-10)


def test_reading_without_learning() -> None:
    """`learn=False` changes no CMS weight; the segment it touched is skipped and learning resumes after it. A
    segment completed by a learning call learns when a `learn=False` call reads its next token, without that
    pair, as `forget_context` would."""
    model = online_model(cms_levels=(None, 4), cms_lr=(0.0, 0.5))
    ids = torch.randint(0, 64, (1, 13))
    with torch.no_grad():
        _, done = model(ids[:, :4])  # a completed segment, waiting for token 4
        _, quiet = model(ids[:, 4:5], done, learn=False)
        _, loud = model(ids[:, 4:5], done)
        forgot = model.forget_context(done)
        for a, b in zip(cms_states(quiet), cms_states(forgot), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert (quiet.blocks[0].cms.levels[1].weights[0] - loud.blocks[0].cms.levels[1].weights[0]).abs().max() > 0
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
