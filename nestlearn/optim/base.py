"""The shape every deep optimizer shares: a `torch.optim.Optimizer` whose `step` hands each parameter, its
gradient, its state dict and its group's hyper-parameters to a small functional core.

What this is: `MemoryOptimizer` (the loop, closures, no-grad) and argument checks with messages that name the
fix. What it is not: any update rule; those live in the modules beside this one, one per equation family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

Core = Callable[[Tensor, Tensor, dict[str, Any], dict[str, Any]], None]


class MemoryOptimizer(torch.optim.Optimizer):
    """Applies `self.core(param, grad, state, group)` to every parameter with a gradient.

    Subclasses set `core` and may set `matrix_only = True` (then a parameter that is not 2-D is refused with a
    message pointing at `nestlearn.optim.route`). A subclass may instead define `core_batch(params, grads,
    states, group)`, called once per group of parameters of one shape, dtype and device, so that matrix work
    (Newton-Schulz) runs as one batched call instead of one small call per matrix.
    """

    core: Core
    core_batch: Callable[[list[Tensor], list[Tensor], list[dict[str, Any]], dict[str, Any]], None] | None = None
    matrix_only = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        if self.matrix_only:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(
                            f"{type(self).__name__} updates 2-D weight matrices only, got a parameter of shape "
                            f"{tuple(p.shape)}; send vectors, embeddings and heads to AdamW with "
                            "nestlearn.optim.route(model, ...)"
                        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            if self.core_batch is None:
                for p in params:
                    self.core(p, p.grad, self.state[p], group)
                continue
            buckets: dict[tuple[Any, ...], list[Tensor]] = {}
            for p in params:
                buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for ps in buckets.values():
                self.core_batch(ps, [p.grad for p in ps], [self.state[p] for p in ps], group)
        return loss


def check_lr(lr: float, name: str = "lr") -> None:
    if not (isinstance(lr, int | float) and lr >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {lr!r}")


def check_unit(x: float, name: str) -> None:
    """A decay or momentum factor in [0, 1)."""
    if not (isinstance(x, int | float) and 0 <= x < 1):
        raise ValueError(f"{name} must lie in [0, 1), got {x!r}")


def check_positive(x: float, name: str) -> None:
    if not (isinstance(x, int | float) and x > 0):
        raise ValueError(f"{name} must be > 0, got {x!r}")
