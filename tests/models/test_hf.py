"""Hugging Face integration: Auto classes, save_pretrained / from_pretrained round trip, generate() with the
learning state as cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers", minversion="5.20")  # the `hf` extra
from transformers import AutoConfig, AutoModelForCausalLM

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
    learned = state.layers[0][-1][1].weights[0]
    assert (learned - model.lm.blocks[0].mlp.levels[1].gate.weight).abs().max() > 0
