"""Hugging Face integration: Auto classes, save_pretrained / from_pretrained round trip (RoPE scaling included),
generate() with the learning state as cache, stopping at eos_token_id, and padded batches refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers", minversion="5.20")  # the `hf` extra
from transformers import AutoConfig, AutoModelForCausalLM

from nestlearn.layers.basic import RotaryEmbedding
from nestlearn.models import ModelState
from nestlearn.models.hf import NestLearnConfig, NestLearnForCausalLM
from tests.models.test_lm import tiny


def hf_model(variant: str) -> NestLearnForCausalLM:
    cfg = NestLearnConfig.from_model_config(tiny(variant).config)
    torch.manual_seed(0)
    return NestLearnForCausalLM(cfg).eval()


@pytest.mark.parametrize("variant", ["hope", "titans_mag", "transformer"])
def test_round_trip_reproduces_logits(tmp_path, variant: str) -> None:
    model = hf_model(variant)
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        out = model(ids, labels=ids)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), NestLearnConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, NestLearnForCausalLM)
    with torch.no_grad():
        again = loaded(ids, labels=ids)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
    assert isinstance(out.cache, ModelState) and out.loss is not None
    assert loaded.lm.lm_head.weight.data_ptr() == loaded.lm.embed.weight.data_ptr()  # still tied


def test_generate_uses_the_learning_state() -> None:
    """HF greedy generate == nestlearn's generate; the prompt is read once, then one token per step."""
    model = hf_model("hope")
    ids = torch.randint(0, 64, (2, 9))
    seen = []
    original = model.lm.forward
    model.lm.forward = lambda x, s=None: (seen.append(x.shape[1]), original(x, s))[1]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.lm.forward = original
    ours, _ = model.lm.generate(ids, 5, temperature=0)
    torch.testing.assert_close(out[:, 9:], ours)
    assert seen == [9, 1, 1, 1, 1]


def test_generate_keeps_the_cms_learning() -> None:
    """An online-CMS model under HF generate learns as nestlearn's generate does (segments of 4 tokens here)."""
    cfg = dataclasses.replace(tiny("hope_attention").config, cms_levels=(None, 4), cms_lr=(0.0, 0.5))
    torch.manual_seed(0)
    model = NestLearnForCausalLM(NestLearnConfig.from_model_config(cfg)).eval()
    ids = torch.randint(0, 64, (2, 9))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    ours, state = model.lm.generate(ids, 6, temperature=0)
    torch.testing.assert_close(out.sequences[:, 9:], ours)
    learned = state.blocks[0].cms.levels[1].weights[0]
    assert (learned - model.lm.blocks[0].mlp.levels[1].gate.weight).abs().max() > 0


def test_padding_is_refused_and_a_mask_of_ones_is_accepted() -> None:
    """The memories would read pad tokens: a mask with zeros is refused in forward and generate; ones change
    nothing."""
    model = hf_model("hope")
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones_like(ids)
    plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    masked = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(masked, plain, rtol=0, atol=0)
    mask[1, :2] = 0  # a left-padded second prompt
    refusal = r"padded batches are not supported.*memories .* would read the pad tokens; generate each prompt"
    with pytest.raises(ValueError, match=refusal):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match=refusal):
        model(ids, attention_mask=mask)


def test_eos_token_id_stops_generation() -> None:
    """transformers stops a sequence at eos_token_id and pads it with pad_token_id; the state is its cache."""
    model = hf_model("titans_mag")  # its greedy tokens change (tiny hope's repeat)
    ids = torch.randint(0, 64, (1, 5))
    free, _ = model.lm.generate(ids, 12, temperature=0)
    eos = int(free[0, -1])
    n = free[0].tolist().index(eos) + 1
    assert 1 < n < 12
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    torch.testing.assert_close(out[:, 5:], free[:, :n])


def test_rope_scaling_survives_save_and_load(tmp_path) -> None:
    """The rotary frequencies are a non-persistent buffer that `_init_weights` recomputes on loading: with the
    config's llama3 scaling, not plain RoPE."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 40
    cfg = dataclasses.replace(tiny("transformer").config, rope_scaling=tuple(sorted(scaling.items())))
    model = NestLearnForCausalLM(NestLearnConfig.from_model_config(cfg)).eval()
    rope = model.lm.blocks[0].mixers[0].rope
    plain = RotaryEmbedding(rope.head_dim, rope.base).inv_freq
    assert (rope.inv_freq - plain).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm.config == cfg
    torch.testing.assert_close(loaded.lm.blocks[1].mixers[0].rope.inv_freq, rope.inv_freq, rtol=0, atol=0)
    ids = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
