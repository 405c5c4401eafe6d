"""Ad-hoc level stacking (§7.3): small random Llama / Mistral / Qwen2 models built from a config (no download)
convert into Hope-Attention models that compute the same logits while the CMS rates are zero, and learn online
when they are not."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.20")  # the `hf` extra builds the references

from nestlearn.models.convert import from_pretrained_llama  # noqa: E402

SMALL = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 24}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}
LEVELS = (None, 8, 16)


def pretrained(tmp_path, arch: str):
    """A random model of the architecture saved with save_pretrained, and the directory."""
    cfg_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**SMALL, **extra)
    model = getattr(transformers, model_name)(cfg).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_zero_rates_reproduce_the_original_logits(tmp_path, arch: str) -> None:
    """float32, 40 tokens (past the Mistral window of 24 and several CMS boundaries): max error <= 1e-6
    (measured 0.7-1.2e-7)."""
    ref_model, path = pretrained(tmp_path, arch)
    ours = from_pretrained_llama(path, cms_levels=LEVELS, cms_lr=0.0)
    assert ours.online is not None  # the online machinery runs, with zero rates
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = ref_model(ids).logits
        got, _ = ours(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_positive_rates_learn_online(tmp_path) -> None:
    ref_model, path = pretrained(tmp_path, "llama")
    ours = from_pretrained_llama(path, cms_levels=LEVELS, cms_lr=0.05)
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        ref = ref_model(ids).logits
        got, _ = ours(ids)
    torch.testing.assert_close(got[:, :8], ref[:, :8], rtol=0, atol=1e-6)  # before the first update
    assert (got[:, 8:] - ref[:, 8:]).abs().max() > 1e-4


def test_bad_checkpoints_name_the_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        from_pretrained_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported architecture .gpt2.*llama, mistral, qwen2"):
        from_pretrained_llama(tmp_path)
    cfg = {"model_type": "llama", **SMALL, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'llama3'"):
        from_pretrained_llama(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no \.safetensors weights"):
        from_pretrained_llama(tmp_path)
