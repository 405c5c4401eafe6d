"""Parameter routing: 2-D hidden matrices to a matrix optimizer, everything else to AdamW.

What this is: `split_parameters(model)` (two disjoint lists, every parameter exactly once, tied weights once),
`route(model, "muon" | "m3" | "delta" | "dmgd" | "preconditioned" | "adamw", ...)` which builds the pair, and
`MultiOptimizer`, which steps, zeroes, saves and loads several optimizers as one. Embeddings, the LM head (or
any weight tied to an embedding), norms, biases, gates and non-2-D tensors (e.g. memories' initial states
`[H, o, i]`) go to AdamW: orthogonalised or matrix-memory updates are meant for hidden linear maps.
What it is not: a learning-rate schedule (the trainer owns those).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .deep import DeepMomentum
from .momentum import DeltaMomentum, PreconditionedMomentum
from .muon import M3, Muon

MATRIX_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "muon": Muon,
    "m3": M3,
    "delta": DeltaMomentum,
    "dmgd": DeepMomentum,
    "preconditioned": PreconditionedMomentum,
}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """`(matrices, others)`: trainable 2-D weights of hidden layers, and every other trainable parameter.

    Raises if a parameter would land in both or neither (a bug, not a user error)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_ids = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name.endswith("lm_head.weight")}
    matrices, others, seen = [], [], set()
    for _, p in model.named_parameters():  # tied parameters are listed once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        hidden_matrix = p.dim() == 2 and id(p) not in embedding_ids and id(p) not in head_ids
        (matrices if hidden_matrix else others).append(p)
    everything = {id(p) for p in model.parameters() if p.requires_grad}
    routed = [id(p) for p in matrices + others]
    if len(routed) != len(set(routed)) or set(routed) != everything:
        raise RuntimeError("parameter routing lost or duplicated a parameter")
    return matrices, others


class MultiOptimizer:
    """Several optimizers stepped as one (`step`, `zero_grad`, `state_dict`, `load_state_dict`, `param_groups`)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state) != len(self.optimizers):
            raise ValueError(f"state has {len(state)} optimizers, this MultiOptimizer {len(self.optimizers)}")
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(state[str(i)])


def route(
    model: nn.Module,
    matrix: str = "muon",
    *,
    lr: float = 0.02,
    adamw_lr: float = 3e-4,
    weight_decay: float = 0.0,
    matrix_kwargs: dict[str, Any] | None = None,
    adamw_kwargs: dict[str, Any] | None = None,
) -> MultiOptimizer:
    """`matrix` optimizer (lr `lr`) on the hidden matrices, AdamW (lr `adamw_lr`) on the rest. `matrix="adamw"`
    gives one AdamW over everything (with `adamw_lr`)."""
    adamw_kwargs = {"weight_decay": weight_decay, **(adamw_kwargs or {})}
    if matrix == "adamw":
        return MultiOptimizer(torch.optim.AdamW(model.parameters(), lr=adamw_lr, **adamw_kwargs))
    if matrix not in MATRIX_OPTIMIZERS:
        raise ValueError(f"unknown matrix optimizer {matrix!r}; choose one of {', '.join(MATRIX_OPTIMIZERS)}, adamw")
    matrices, others = split_parameters(model)
    kwargs = {"weight_decay": weight_decay, **(matrix_kwargs or {})}
    first = MATRIX_OPTIMIZERS[matrix](matrices, lr=lr, **kwargs) if matrices else None
    second = torch.optim.AdamW(others, lr=adamw_lr, **adamw_kwargs) if others else None
    return MultiOptimizer(first, second)
