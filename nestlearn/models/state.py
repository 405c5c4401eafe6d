"""Saving and loading a model's learning state (D12): every memory's fast weights, momenta and chunk anchors,
short-convolution inputs and attention caches, so a deployed model keeps learning across calls.

The state also holds the CMS fast weights (with their accumulated gradients) and an online CMS's unfinished
segment. What this is: `save_state(state, directory)` / `load_state(directory, model)`, on top of
`nestlearn.io` (safetensors + JSON, atomic, hash-checked). The state is a tree of NamedTuples and tuples with
tensor and int leaves; it is flattened to dotted paths. Loading rebuilds the tree from the model's own
`init_state`, so a state from another configuration or batch size is refused with a message. What it is not:
model weights (those are `save_pretrained` / the trainer's checkpoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import load_bundle, save_bundle
from .lm import CausalLM, ModelState
from .online import Pending

NAME = "state"


def save_state(state: ModelState, directory: str | Path) -> Path:
    """Write `directory/state.safetensors` + `directory/state.json`."""
    if not isinstance(state, ModelState):
        raise ValueError(f"save_state needs a ModelState, got {type(state).__name__}")
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    _flatten(state.layers, "layers", tensors, scalars)
    if state.pending is not None:
        _flatten(state.pending, "pending", tensors, scalars)
    meta = {
        "kind": "nestlearn.ModelState",
        "fingerprint": state.fingerprint,
        "position": state.position,
        "batch_size": state.batch_size,
        "pending": state.pending is not None,
        "scalars": scalars,
    }
    return save_bundle(directory, NAME, tensors, meta)


def load_state(directory: str | Path, model: CausalLM) -> ModelState:
    """Read a state saved by `save_state` for this model, on the model's device."""
    tensors, meta = load_bundle(directory, NAME)
    if meta.get("kind") != "nestlearn.ModelState":
        raise ValueError(f"{directory} holds {meta.get('kind')!r}, not a model state")
    if meta["fingerprint"] != model.config.fingerprint():
        raise ValueError(
            f"the state in {directory} was saved by a model with another configuration; load it into that model "
            "or start from model.init_state(batch_size)"
        )
    template = model.init_state(meta["batch_size"])
    layers = _unflatten(template.layers, "layers", tensors, meta["scalars"], model.device)
    pending = None
    if meta.get("pending"):  # an online CMS's unfinished segment: its tokens and the states at its start
        empty = torch.zeros(meta["batch_size"], 0, dtype=torch.long, device=model.device)
        pending = _unflatten(Pending(empty, template.layers), "pending", tensors, meta["scalars"], model.device)
    return ModelState(layers, meta["position"], meta["fingerprint"], pending)


def _flatten(tree: Any, path: str, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
    if isinstance(tree, Tensor):
        tensors[path] = tree
    elif isinstance(tree, tuple | list):
        for i, item in enumerate(tree):
            _flatten(item, f"{path}.{i}", tensors, scalars)
    elif isinstance(tree, int | float | str | bool) or tree is None:
        scalars[path] = tree
    else:
        raise ValueError(f"cannot save a state leaf of type {type(tree).__name__} at {path}")


def _unflatten(template: Any, path: str, tensors: dict[str, Tensor], scalars: dict[str, Any], device: torch.device):
    if scalars.get(path, 0) is None:  # saved as None (e.g. a block not yet started in a pending segment)
        return None
    if isinstance(template, Tensor):
        if path not in tensors or not _compatible(tensors[path], template):
            raise ValueError(
                f"saved state has no tensor {path} shaped like {tuple(template.shape)}; it belongs elsewhere"
            )
        return tensors[path].to(device=device, dtype=template.dtype)
    if isinstance(template, tuple | list):
        items = [_unflatten(t, f"{path}.{i}", tensors, scalars, device) for i, t in enumerate(template)]
        return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
    if path not in scalars:
        raise ValueError(f"saved state has no value for {path}; it belongs to another model")
    return scalars[path]


def _compatible(saved: Tensor, template: Tensor) -> bool:
    """Same shape, except where the template is empty (attention caches grow: their length dim is 0 at init)."""
    if saved.dim() != template.dim():
        return False
    return all(t in (s, 0) for s, t in zip(saved.shape, template.shape, strict=True))
