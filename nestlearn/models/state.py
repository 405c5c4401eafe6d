"""Saving and loading a model's learning state (D12): every memory's fast weights, momenta and chunk anchors,
short-convolution inputs, attention caches, the CMS fast weights with their accumulated gradients, and an online
CMS's unfinished segment, so a deployed model keeps learning across calls.

What this is: `save_state(state, directory)` / `load_state(directory, model)`, on top of `nestlearn.io`
(safetensors + JSON, atomic, hash-checked; `split_tree` / `join_tree`, the serializer the trainer's checkpoints
use too). Tensors are stored under the state's field names (`blocks.0.mixers.0.memory.weights.1`,
`blocks.1.cms.levels.2.grads.0`); loading rebuilds the typed state against the model's own `init_state`, so a
state from another configuration or batch size is refused with a message. The file format is versioned
(`STATE_FORMAT`); a file from an earlier format is refused with a message saying how to get a state again.
What it is not: model weights (those are `save_pretrained` / the trainer's checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..io import join_tree, load_bundle, save_bundle, split_tree
from .lm import CausalLM, ModelState, Pending

NAME = "state"
KIND = "nestlearn.ModelState"
# 2: typed block states (mixers, cms) saved by field name. 1 (no "state_format" key): positional tuples.
STATE_FORMAT = 2


def save_state(state: ModelState, directory: str | Path) -> Path:
    """Write `directory/state.safetensors` + `directory/state.json`."""
    if not isinstance(state, ModelState):
        raise ValueError(f"save_state needs a ModelState, got {type(state).__name__}")
    tensors, structure = split_tree({"blocks": state.blocks, "pending": state.pending}, "state")
    meta = {
        "kind": KIND,
        "state_format": STATE_FORMAT,
        "fingerprint": state.fingerprint,
        "position": state.position,
        "batch_size": state.batch_size,
        "structure": structure,
    }
    return save_bundle(directory, NAME, tensors, meta)


def load_state(directory: str | Path, model: CausalLM) -> ModelState:
    """Read a state saved by `save_state` for this model, on the model's device."""
    tensors, meta = load_bundle(directory, NAME)
    if meta.get("kind") != KIND:
        raise ValueError(f"{directory} holds {meta.get('kind')!r}, not a model state")
    if meta.get("state_format", 1) != STATE_FORMAT:
        raise ValueError(
            f"the state in {directory} is in state format {meta.get('state_format', 1)} (an earlier nestlearn); "
            f"this version reads format {STATE_FORMAT}. States hold what a model read, not weights: read the "
            "documents again with this version (model.learn) and save that state"
        )
    if meta["fingerprint"] != model.fingerprint:
        raise ValueError(
            f"the state in {directory} was saved by a model with another configuration; load it into that model "
            "or start from model.init_state(batch_size)"
        )
    template = model.init_state(meta["batch_size"])
    empty = torch.zeros(meta["batch_size"], 0, dtype=torch.long, device=model.device)
    like = {"blocks": template.blocks, "pending": Pending(empty, template.blocks)}

    def check(saved: Tensor, like: Tensor, path: str) -> Tensor:
        if not _compatible(saved, like):
            raise ValueError(
                f"the saved tensor {path} has shape {tuple(saved.shape)} where this model's state has "
                f"{tuple(like.shape)}; the state belongs to another model"
            )
        return saved.to(device=model.device, dtype=like.dtype)

    tree = join_tree(tensors, meta["structure"], like, check, root="state")
    return ModelState(tree["blocks"], meta["position"], meta["fingerprint"], tree["pending"])


def _compatible(saved: Tensor, template: Tensor) -> bool:
    """Same shape, except where the template is empty (attention caches grow: their length dim is 0 at init)."""
    if saved.dim() != template.dim():
        return False
    return all(t in (s, 0) for s, t in zip(saved.shape, template.shape, strict=True))
