"""Model configs, the causal LM of every variant, its state (save / load) and the Hugging Face adapter."""

from .config import PRESETS, VARIANTS, ModelConfig, preset
from .lm import CausalLM, ModelState, count_parameters, next_token_loss
from .state import load_state, save_state

__all__ = [
    "PRESETS",
    "VARIANTS",
    "CausalLM",
    "ModelConfig",
    "ModelState",
    "count_parameters",
    "load_state",
    "next_token_loss",
    "preset",
    "save_state",
]
