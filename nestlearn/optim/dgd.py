"""Delta Gradient Descent for linear layers (Eq. 57): GD whose step also forgets along the current inputs.

What this is: `DeltaGD(linears, lr, proj_lr)`, a drop-in optimizer for the weights of `nn.Linear` modules:

    W <- W (I - proj_lr E[x̂ x̂^T]) - lr dL/dW,     x̂ = x / ||x||

where the expectation runs over the inputs the layer saw since the last step (captured by a forward hook; the
per-sample Eq. 57 averaged over a batch, the natural batch form of the update). The first term is the
"adaptive decay based on the current data sample": the part of W that acts on the current inputs is partly
forgotten before the new association is written. `proj_lr = 0` is plain SGD (`torch.optim.SGD`) exactly.
A layer that did not run since the last step gets the plain GD step. `weight_decay` is decoupled:
`W <- (1 - lr wd) W (I - proj_lr E[x̂ x̂^T]) - lr dL/dW`. `zero_grad()` also forgets the captured
inputs, so call it before the forward pass (or after `step`), not between forward and step. `remove()` detaches
the hooks.
What it is not: the DGD inside the memories of HOPE (that is the memory op, `ops/memory`, D4).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .base import MemoryOptimizer, check_lr


class DeltaGD(MemoryOptimizer):
    """Eq. 57 on the weights of the given `nn.Linear` modules (their biases, if any, are not included)."""

    matrix_only = True

    def __init__(
        self, linears: Iterable[nn.Linear], lr: float = 1e-2, proj_lr: float | None = None, weight_decay: float = 0.0
    ) -> None:
        linears = list(linears)
        for mod in linears:
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"DeltaGD needs nn.Linear modules (it uses their inputs), got {type(mod).__name__}")
        check_lr(lr)
        proj_lr = lr if proj_lr is None else proj_lr
        check_lr(proj_lr, "proj_lr")
        check_lr(weight_decay, "weight_decay")
        super().__init__([m.weight for m in linears], dict(lr=lr, proj_lr=proj_lr, weight_decay=weight_decay))
        self._inputs: dict[int, tuple[Tensor, int]] = {}  # id(weight) -> (sum of x̂ x̂^T, count)
        self._hooks = [m.register_forward_pre_hook(self._capture) for m in linears]

    def _capture(self, module: nn.Linear, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, module.in_features).to(module.weight.dtype)
        xh = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        total, n = self._inputs.get(id(module.weight), (0, 0))
        self._inputs[id(module.weight)] = (total + xh.T @ xh, n + x.shape[0])

    def core(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        seen = self._inputs.pop(id(p), None)
        if seen is not None and group["proj_lr"]:
            total, n = seen
            p.sub_(p @ total, alpha=group["proj_lr"] / n)  # W (I - proj_lr E[x̂ x̂^T])
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(g, alpha=group["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._inputs.clear()  # inputs of a discarded step must not leak into the next

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
