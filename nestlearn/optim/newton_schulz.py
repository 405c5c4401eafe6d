"""Newton–Schulz orthogonalisation: the nonlinear output of Eq. 52 that turns momentum into Muon.

What this is: `newton_schulz(g)`, `g -> ≈ U V^T` for `g = U S V^T`, by the quintic iteration
`X <- a X + (b A + c A^2) X` with `A = X X^T` and (a, b, c) = (3.4445, -4.7750, 2.0315) (the Muon coefficients,
which push small singular values up fast and leave the result in a band around 1 instead of exactly 1), and
`muon_scale(shape)`, Muon's per-shape step scaling. `cubic=True` gives the classic cubic iteration
`X <- 1.5 X - 0.5 X X^T X`, which is GD on `||X^T X - I||_F^2` from `X_0 = g` (Eqs. 43-44).
What it is not: an optimizer (`muon.py`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: Tensor,
    steps: int = 5,
    *,
    coefficients: tuple[float, float, float] = QUINTIC,
    cubic: bool = False,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Orthogonalise a matrix `[m, n]` (or a batch `[..., m, n]`) in `dtype`; returns g's dtype.

    The input is scaled to Frobenius norm 1 (so every singular value is <= 1) and the iteration runs on the
    wide orientation (`m <= n`), as Muon does; bfloat16 by default, also as Muon does.
    """
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    if x.dim() == 2:  # the same kernels as torch.optim.Muon (fused multiply-adds), so results agree exactly
        x = x / x.norm().clamp(min=eps)
        mul_add = torch.addmm
    else:
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        mul_add = torch.baddbmm
    a, b, c = (1.5, -0.5, 0.0) if cubic else coefficients
    for _ in range(steps):
        gram = x @ x.mT
        x = mul_add(x, mul_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a X + (b A + c A^2) X
    return (x.mT if tall else x).to(g.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...], mode: str = "original") -> float:
    """Muon's step multiplier for an `[m, n]` weight: "original" `sqrt(max(1, m / n))`, "match_rms_adamw"
    `0.2 sqrt(max(m, n))` (an update RMS like AdamW's), "none" 1."""
    m, n = shape[0], shape[1]
    if mode == "original":
        return math.sqrt(max(1.0, m / n))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if mode == "none":
        return 1.0
    raise ValueError(f"scale must be 'original', 'match_rms_adamw' or 'none', got {mode!r}")
