"""Ad-hoc level stacking (§7.3): a pretrained Llama-family checkpoint becomes a Hope-Attention model.

What this is: `from_pretrained_llama(directory)` reads a local Hugging Face checkpoint directory (`config.json`
plus safetensors weights) of a Llama (3.x included, with its RoPE scaling), Mistral or Qwen2 causal LM and builds
`CausalLM(variant="hope_attention")`: embeddings, norms, attention and LM head copied; every CMS level initialised
from the block's pretrained MLP (`MLP_0^(f_i) = MLP_pretrained`, §7.3). The CMS is the independent variant
(Eq. 74) with mixing weights 1/k, so the k identical levels sum to the pretrained MLP and, with every level's
learning rate at zero, the converted model computes the original's logits; with positive rates the levels then
drift apart as they learn online.
Nothing is downloaded and transformers is not needed.
What it is not: continual pre-training (that is the trainer's job) or support for other architectures.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..layers.basic import ROPE_SCALINGS
from .config import ModelConfig
from .lm import CausalLM

SUPPORTED = ("llama", "mistral", "qwen2")


def from_pretrained_llama(
    directory: str | Path,
    *,
    cms_levels: Sequence[int | None] = (None, 512, 2048),
    cms_lr: float | Sequence[float] = 0.0,
    dtype: torch.dtype = torch.float32,
    verbose: bool = True,
    **overrides: Any,
) -> CausalLM:
    """Convert the checkpoint in `directory` (Llama, Mistral or Qwen2) into a Hope-Attention `CausalLM`.

    `cms_levels` / `cms_lr`: the CMS levels (chunk sizes, None = static) and their learning rates (0 = the
    original model exactly). `dtype`: the floating dtype of the converted weights (float32 by default;
    torch.bfloat16 or torch.float16 halve the memory; the checkpoint's tensors are cast to it). `verbose`:
    print one line to stderr with the converted model's size (parameters, every CMS copy of the MLP included,
    and bytes at `dtype`) before the weights are read; False = silent. `overrides` go to `ModelConfig` (e.g.
    `cms_online_layers`, `max_seq_len`). Plain RoPE and the "linear" and "llama3" RoPE scalings are carried
    over (`ModelConfig.rope_scaling`); other scalings are refused.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}")
    directory = Path(directory)
    hf = _read_config(directory)
    cfg = ModelConfig(
        **{
            **_model_config(hf),
            "cms_levels": tuple(cms_levels),
            "cms_variant": "independent",
            "cms_lr": cms_lr if isinstance(cms_lr, float | int) else tuple(cms_lr),
            **overrides,
        }
    )
    with torch.device("meta"):
        model = CausalLM(cfg)
    if verbose:
        _report_size(directory, model, dtype)
    weights = _read_weights(directory)
    model.load_state_dict(_our_state_dict(weights, cfg), assign=True, strict=True)
    model = model.to(dtype)
    for block in model.blocks:  # non-persistent buffers are not in the checkpoint
        rope = block.mixers[0].rope
        rope.inv_freq = rope.frequencies(torch.device("cpu"))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def _report_size(directory: Path, model: CausalLM, dtype: torch.dtype) -> None:
    """One line on stderr: parameters of the converted model (built on the meta device) and their bytes."""
    n = sum(p.numel() for p in model.parameters())
    levels = len(model.config.cms_levels)
    print(
        f"nestlearn: converting {directory} into Hope-Attention with {levels} CMS level(s) per block: "
        f"{n:,} parameters, {_bytes(n * dtype.itemsize)} at {dtype}",
        file=sys.stderr,
    )


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json; give a local Hugging Face checkpoint directory")
    hf = json.loads(path.read_text())
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(
            f"unsupported architecture {kind!r} in {path}; conversion supports {', '.join(SUPPORTED)} "
            "(Llama-family decoders with RMSNorm, RoPE and SwiGLU MLPs)"
        )
    return hf


def _model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a Llama-family config; refuses what the converted model would compute differently."""
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: the CMS levels are SwiGLU (silu) MLPs")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads; not supported")
    theta, scaling = _rope(hf)
    if hf.get("mlp_bias") or (hf["model_type"] == "llama" and hf.get("attention_bias")):
        raise ValueError("MLP biases and output-projection biases are not supported")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 per-layer sliding windows are not supported; set use_sliding_window to false")
    window = hf.get("sliding_window") if hf["model_type"] == "mistral" else None
    return {
        "variant": "hope_attention",
        "vocab_size": hf["vocab_size"],
        "d_model": hidden,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "qkv_bias": hf["model_type"] == "qwen2",
        "mlp_hidden": hf["intermediate_size"],
        "rope_base": theta,
        "rope_scaling": scaling,
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_seq_len": hf.get("max_position_embeddings", 8192),
        "window": window,
    }


def _rope(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """RoPE base and scaling (sorted key-value pairs, None = plain) from `rope_parameters` (transformers 5) or
    `rope_scaling` with a top-level `rope_theta` (older config.json files)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"unsupported RoPE scaling {kind!r}; conversion supports plain RoPE and the "
            f"{' and '.join(map(repr, ROPE_SCALINGS))} scalings"
        )
    scaling = {"rope_type": kind, **{key: rope[key] for key in ROPE_SCALINGS[kind] if key in rope}}
    if kind == "llama3":  # as transformers does when the checkpoint leaves it out
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, tuple(sorted(scaling.items()))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{directory} has no .safetensors weights; save the model with save_pretrained() (safetensors is "
            "its default) and convert that directory"
        )
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _our_state_dict(w: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face names to ours; every CMS level gets a copy of the block's MLP."""
    k = len(cfg.cms_levels)
    out = {"embed.weight": _take(w, "model.embed_tokens.weight"), "norm.weight": _take(w, "model.norm.weight")}
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else _take(w, "lm_head.weight")
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "norms.0.weight"] = _take(w, src + "input_layernorm.weight")
        out[dst + "mlp_norm.weight"] = _take(w, src + "post_attention_layernorm.weight")
        for p in ("q", "k", "v", "o"):
            out[dst + f"mixers.0.{p}_proj.weight"] = _take(w, src + f"self_attn.{p}_proj.weight")
            if cfg.qkv_bias and p != "o":
                out[dst + f"mixers.0.{p}_proj.bias"] = _take(w, src + f"self_attn.{p}_proj.bias")
        for level in range(k):
            for p in ("gate", "up", "down"):
                out[dst + f"mlp.levels.{level}.{p}.weight"] = _take(w, src + f"mlp.{p}_proj.weight").clone()
        out[dst + "mlp.mix"] = torch.full((k,), 1.0 / k)
        if cfg.cms_learn_lr:
            out[dst + "mlp.log_lr"] = torch.tensor(cfg.level_lrs).log()
    return out


def _take(w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in w:
        raise ValueError(f"the checkpoint has no tensor {name!r}; it is not a complete Llama-family checkpoint")
    return w[name]
