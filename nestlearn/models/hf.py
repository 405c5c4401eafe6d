"""Hugging Face integration: `NestLearnConfig` / `NestLearnForCausalLM`, registered with `AutoConfig` and
`AutoModelForCausalLM` under the model type "nestlearn".

What this is: a thin adapter over `CausalLM`. `generate()` uses the model's learning state (D12) as its cache:
the state after the prompt is what later steps read, so the memories keep learning while text is generated,
and decoding a token costs the same at any context length for the recurrent variants. `save_pretrained` /
`from_pretrained` write and read safetensors weights and the nestlearn config in `config.json`. An
`attention_mask` of ones is accepted; one with zeros (a padded batch) is refused, because the memories are
per-sequence recurrent states that would read the pad tokens and the batch shares one position.
What it is not: a tokenizer, support for padded batches, or support for the Hub (nothing is ever downloaded).
Needs the `hf` extra (`pip install 'nestlearn[hf]'`, transformers 5.x).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("nestlearn.models.hf needs transformers 5.x: pip install 'nestlearn[hf]'") from e

from ..layers.basic import RotaryEmbedding
from .config import ModelConfig
from .lm import CausalLM, ModelState, next_token_loss


class NestLearnConfig(PretrainedConfig):
    """Holds a `ModelConfig` (as the dict `nestlearn`) inside a Hugging Face config."""

    model_type = "nestlearn"

    def __init__(self, nestlearn: dict[str, Any] | None = None, **kwargs: Any) -> None:
        cfg = ModelConfig.from_dict(nestlearn or {})
        self.nestlearn = cfg.to_dict()
        kwargs.setdefault("tie_word_embeddings", cfg.tie_embeddings)
        kwargs.setdefault("vocab_size", cfg.vocab_size)
        kwargs.setdefault("hidden_size", cfg.d_model)
        kwargs.setdefault("num_hidden_layers", cfg.n_layers)
        kwargs.setdefault("num_attention_heads", cfg.n_heads)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> NestLearnConfig:
        return cls(nestlearn=cfg.to_dict(), **kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.nestlearn)


class NestLearnForCausalLM(PreTrainedModel, GenerationMixin):
    """`CausalLM` as a Hugging Face causal LM; `cache` is the nestlearn `ModelState`."""

    config_class = NestLearnConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _is_stateful = True

    def __init__(self, config: NestLearnConfig) -> None:
        super().__init__(config)
        self.lm = CausalLM(config.model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"lm.lm_head.weight": "lm.embed.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the learning state is the cache; transformers must not make a DynamicCache

    def _init_weights(self, module: torch.nn.Module) -> None:
        """`CausalLM` initialises its parameters itself and `from_pretrained` overwrites them; only the rotary
        frequencies (a non-persistent buffer, not in the checkpoint) must be recomputed here, with the config's
        RoPE scaling (`RotaryEmbedding.frequencies` applies it)."""
        if isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(module.frequencies(module.inv_freq.device))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.lm.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.lm.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: ModelState | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids `[B, T]`, cache: a `ModelState` or None; labels `[B, T]` (shifted inside, -100 ignored);
        attention_mask: None or all ones (zeros are refused, see the module docstring; one host sync)."""
        _check_attention_mask(attention_mask)
        state = cache if isinstance(cache, ModelState) else None
        if state is None:  # a new prompt: refuse ids outside the vocabulary (later steps feed sampled ids)
            self.lm.check_vocabulary(input_ids)
        logits, state = self.lm(input_ids, state)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits[:, :-1], labels[:, 1:])  # -100 is ignored
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=state)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: ModelState | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the state has not read yet (the whole prompt first, then one per step). The
        attention mask goes with the prompt, where `forward` checks it; later steps only append ones to it."""
        state = cache if isinstance(cache, ModelState) else None
        if state is not None:
            input_ids, attention_mask = input_ids[:, state.position :], None
        return {"input_ids": input_ids, "cache": state, "attention_mask": attention_mask}


def _check_attention_mask(attention_mask: torch.Tensor | None) -> None:
    """Accept None or a mask of ones `[B, T]`; refuse padding."""
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise ValueError(
            "attention_mask has zeros, but padded batches are not supported: the memories are per-sequence "
            "recurrent states that would read the pad tokens; generate each prompt separately or batch prompts "
            "of equal length (with an all-ones mask or none)"
        )


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the "nestlearn" model type (idempotent)."""
    with contextlib.suppress(ValueError):  # already registered
        AutoConfig.register(NestLearnConfig.model_type, NestLearnConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(NestLearnConfig, NestLearnForCausalLM)


register()
