"""The paper's 2-D toy objective (Fig. 4): `psi(r, theta) = r^2 + k (r - theta + a sin(w r))^2`.

What this is: `psi` and `run_toy` (a trajectory of any optimizer from (-3.5, 2)), used by the tests and by
`scripts/optim_toy.py`. The paper does not give k, a, w; we use k = 5, a = 1, w = 3 (a curved valley whose
floor `theta = r + sin(3 r)` winds towards the minimum psi = 0 at the origin).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

K, A, W = 5.0, 1.0, 3.0
START = (-3.5, 2.0)


def psi(x: Tensor) -> Tensor:
    """x `[..., 2]` = (r, theta) -> psi `[...]`."""
    r, theta = x[..., 0], x[..., 1]
    return r**2 + K * (r - theta + A * torch.sin(W * r)) ** 2


def run_toy(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], steps: int) -> Tensor:
    """Optimise psi from START with `make([param])`; the parameter is a `[1, 2]` matrix so matrix optimizers
    apply. Returns the trajectory `[steps + 1, 2]` (float64)."""
    x = torch.nn.Parameter(torch.tensor([START], dtype=torch.float64))
    opt = make([x])
    path = [x.detach().clone()[0]]
    for _ in range(steps):
        opt.zero_grad()
        psi(x).sum().backward()
        opt.step()
        path.append(x.detach().clone()[0])
    return torch.stack(path)
