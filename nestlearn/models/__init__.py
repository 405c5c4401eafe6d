"""Model configs and presets, the causal LM of every variant, its state (save / load) and the Hugging Face
adapter (`nestlearn.models.hf`, imported on its own: it needs transformers)."""

from .block import Block, BlockState
from .config import VARIANTS, ModelConfig
from .lm import CausalLM, ModelState, Pending, count_parameters, next_token_loss
from .presets import PRESETS, preset
from .state import load_state, save_state

__all__ = [
    "PRESETS",
    "VARIANTS",
    "Block",
    "BlockState",
    "CausalLM",
    "ModelConfig",
    "ModelState",
    "Pending",
    "count_parameters",
    "load_state",
    "next_token_loss",
    "preset",
    "save_state",
]
