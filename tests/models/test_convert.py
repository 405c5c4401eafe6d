"""Ad-hoc level stacking (§7.3): small random Llama / Mistral / Qwen2 models built from a config (no download)
convert into Hope-Attention models that compute the same logits while the CMS rates are zero (with Llama 3 and
linear RoPE scaling too), and learn online when they are not; the conversion reports the model's size first."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.20")  # the `hf` extra builds the references

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from nestlearn.layers.basic import RotaryEmbedding  # noqa: E402
from nestlearn.models import ModelConfig  # noqa: E402
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
# head dim 8, base 1e4: the frequencies 1, 0.1, 0.01, 0.001 make 16, 1.6, 0.16, 0.016 turns in 100 tokens, so
# llama3 keeps the first, blends the second and divides the others by the factor
SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 100},
    "linear": {"rope_type": "linear", "factor": 4.0},
}  # fmt: skip


def pretrained(tmp_path, arch: str, **kw):
    """A random model of the architecture (config fields `kw` added) saved with save_pretrained, and the directory."""
    cfg_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**SMALL, **{**extra, **kw})
    model = getattr(transformers, model_name)(cfg).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_zero_rates_reproduce_the_original_logits(tmp_path, arch: str) -> None:
    """float32, 40 tokens (past the Mistral window of 24 and several CMS boundaries): max error <= 1e-6
    (measured 0.7-1.2e-7)."""
    ref_model, path = pretrained(tmp_path, arch)
    ours = from_pretrained_llama(path, cms_levels=LEVELS, cms_lr=0.0, verbose=False)
    assert ours.online_segment is not None  # the online machinery runs, with zero rates
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = ref_model(ids).logits
        got, _ = ours(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_positive_rates_learn_online(tmp_path) -> None:
    ref_model, path = pretrained(tmp_path, "llama")
    ours = from_pretrained_llama(path, cms_levels=LEVELS, cms_lr=0.05, verbose=False)
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
    cfg = {"model_type": "llama", **SMALL, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'; conversion supports plain RoPE and the"):
        from_pretrained_llama(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'llama3' takes exactly the keys .*; missing high_freq_factor, low_freq"):
        from_pretrained_llama(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"partial rotary embeddings \(partial_rotary_factor != 1\) are not"):
        from_pretrained_llama(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"dtype must be a floating torch\.dtype such as torch\.float32"):
        from_pretrained_llama(tmp_path, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"no \.safetensors weights"):
        from_pretrained_llama(tmp_path, verbose=False)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_rope_frequencies_match_transformers(kind: str) -> None:
    """Llama 3.1's own settings at head dim 128 (and linear scaling): the scaled frequencies are transformers'
    (computed in float32 there, 1e-6 relative), and differ from plain RoPE."""
    real = {"original_max_position_embeddings": 8192} if kind == "llama3" else {}
    scaling = {**SCALINGS[kind], **real}
    hf = transformers.LlamaConfig(
        hidden_size=512, num_attention_heads=4, rope_parameters={**scaling, "rope_theta": 5e5}
    )
    want, _ = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    got = RotaryEmbedding(128, 5e5, scaling).inv_freq
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)
    assert (RotaryEmbedding(128, 5e5).inv_freq.float() - want).abs().max() > 1e-4


@pytest.mark.parametrize("old_format", [False, True])
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_scaled_rope_reproduces_the_original_logits(tmp_path, kind: str, old_format: bool) -> None:
    """A RoPE-scaled Llama converts to the same logits over 120 tokens (past the original 100), from the
    transformers 5 `rope_parameters` or the older `rope_scaling` + `rope_theta` config.json; converting it with
    plain RoPE does not (weights of std 0.1, logits up to 2.4; measured max error 1.1e-6 scaled, 0.8 plain)."""
    scaling = {**SCALINGS[kind], "rope_theta": 1e4}
    ref_model, path = pretrained(tmp_path, "llama", rope_parameters=scaling, initializer_range=0.1)
    if old_format:
        _to_old_rope_format(path / "config.json")
    ours = from_pretrained_llama(path, cms_levels=LEVELS, verbose=False)
    assert dict(ours.config.rope_scaling) == SCALINGS[kind]
    plain = from_pretrained_llama(path, cms_levels=LEVELS, verbose=False, rope_scaling=None)
    ids = torch.randint(0, 97, (2, 120))
    with torch.no_grad():
        ref = ref_model(ids).logits
        got, unscaled = ours(ids)[0], plain(ids)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (unscaled - ref).abs().max() > 0.1


def _to_old_rope_format(path) -> None:
    """config.json as transformers 4 wrote it: `rope_theta` at the top, the scaling under `rope_scaling` (linear:
    with the older key `type`)."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] == "linear":
        rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    path.write_text(json.dumps(cfg))


def test_the_size_is_reported_before_the_weights_are_read(tmp_path, capsys) -> None:
    """One line on stderr: parameters (every CMS copy included) and bytes at the chosen dtype; it comes before
    the weights are read (a directory without them still prints it); verbose=False is silent."""
    _, path = pretrained(tmp_path, "llama")
    capsys.readouterr()  # save_pretrained's progress bar
    model = from_pretrained_llama(path, cms_levels=LEVELS, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{n:,} parameters, {2 * n / 1e3:.2f} kB at torch.bfloat16" in err
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    from_pretrained_llama(path, cms_levels=LEVELS, verbose=False)
    assert capsys.readouterr().err == ""
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match=r"no \.safetensors weights"):
        from_pretrained_llama(path, cms_levels=LEVELS)
    assert f"{n:,} parameters" in capsys.readouterr().err


def test_rope_scaling_round_trips_through_the_config() -> None:
    """Sorted (key, value) tuples: hashable, equal after JSON, part of the fingerprint; bad scalings name the fix."""
    cfg = ModelConfig(variant="hope_attention", rope_scaling=tuple(SCALINGS["llama3"].items()))
    assert cfg.rope_scaling == tuple(sorted(SCALINGS["llama3"].items()))
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg) and again.fingerprint() == cfg.fingerprint()
    assert cfg.fingerprint() != dataclasses.replace(cfg, rope_scaling=None).fingerprint()
    with pytest.raises(ValueError, match=r"unsupported RoPE scaling rope_type 'yarn'; supported: 'linear', 'llama3'"):
        ModelConfig(variant="hope_attention", rope_scaling=(("factor", 2.0), ("rope_type", "yarn")))
    with pytest.raises(ValueError, match="RoPE scaling factor must be a finite number > 0, got 0"):
        ModelConfig(variant="hope_attention", rope_scaling=(("factor", 0), ("rope_type", "linear")))
    with pytest.raises(ValueError, match=r"rope_scaling must be \(key, value\) pairs"):
        ModelConfig(variant="hope_attention", rope_scaling=("linear", 2.0))
