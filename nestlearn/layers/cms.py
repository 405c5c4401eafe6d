"""Continuum Memory System (Eqs. 70-74): SwiGLU levels that learn at different frequencies.

What this is: `CMS`, `[B, T, D] -> [B, T, D]`, a set of SwiGLU levels combined as a chain (Eq. 70, the default),
nested (Eq. 72) or independent (Eq. 74: a learnable weighted sum). Level l has a chunk size `C_l`; `None` is a
static level (`C_l = inf`: an ordinary MLP that only the outer loop trains). An online level's weights are
per-sequence fast weights held in the state (`CMSLevel`): the meta-learned initial weights broadcast over the
batch, changed every `C_l` tokens by `lr_l` times the sum of the task loss's gradients over that chunk (Eq. 71).
This module applies the weights (`forward`) and the updates (`step`); the gradients come from the language model,
which runs segment by segment and differentiates its next-token loss (D10, `models/lm.py`).
What it is not: the driver of the online updates; it never sees a loss.

Variants (levels listed in chain order, `x` the block input, levels numbered from 1):
    chain        z_0 = x,  z_1 = x + MLP_1(x),  z_l = z_{l-1} + MLP_l(N(z_{l-1})) for l > 1,
                 y = z_k - x                                                               Eqs. 70, 73
    nested       the chain, and level l+1 restarts from a start point that level l learns: at every
                 boundary of level l the start moves by -lr_l * (level l+1's gradients since the last one)
                 and level l+1's weights return to it                                      Eq. 72
    independent  y = sum_l a_l MLP_l(x), a_l learnable, starting at 1/k                    Eq. 74
The residual inside the chain and the normalisation `N(z) = z / sqrt(mean(z^2) + eps)` of every later level's
input are our choices (the paper "disregards normalizations for the sake of clarity" in Eq. 70). The first level
reads the block's pre-normed input as it is, so with one level every variant is the plain MLP `y = MLP(x)`.
`chain="paper"` (chain and nested variants) computes Eq. 70 as printed instead: `y = MLP_k(... MLP_2(MLP_1(x)))`,
each level reading the previous level's output, no residual between levels and no normalisation.
Where the residual goes: in every form the block adds the CMS output to its residual stream, `x + y` with
`y = CMS(RMSNorm(x))` (`models/block.py`); the CMS never adds its own input back. The CMS takes the MLP position
of a pre-norm residual block (D11), and Eq. 70 defines what that position computes, so the paper form changes the
MLP position and nothing around it; with one level every form is then exactly a Transformer block's MLP (§7.1).
Why the norm (`level_norm`, docs/decisions.md): a SwiGLU is homogeneous of degree 2 in its input, so
in an un-normalised chain every later level squares the scale it reads (degree 2^k overall). Training a tiny
HOPE with AdamW at lr 1e-2 took its first level's output to 2e2-1.5e3 and the chain's to 1e20, past the point
where the next RMSNorm's mean square overflows float32 (logits exactly 0, then NaN). With the norm every level
adds a term whose scale does not depend on the scale of its input, as in a pre-norm Transformer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .basic import SwiGLU
from .fast_weights import state_float

CMSVariant = Literal["chain", "nested", "independent"]
CMSChain = Literal["residual", "paper"]
Weights = tuple[Tensor, ...]  # (gate [B, h, D], up [B, h, D], down [B, D, h])


class CMSLevel(NamedTuple):
    """Fast state of one online level, every tensor `[B, ...]` like the weight it belongs to.

    weights: the weights in force; grads: gradients summed since this level's last update; start / start_grads:
    the nested variant's restart point and the gradients summed since the parent level's last boundary (empty
    tuples otherwise).
    """

    weights: Weights
    grads: Weights
    start: Weights = ()
    start_grads: Weights = ()


class CMSState(NamedTuple):
    """The CMS's fast state: one entry per level in chain order, None for a static level."""

    levels: tuple[CMSLevel | None, ...]


class CMS(nn.Module):
    """Continuum Memory System of `len(chunks)` SwiGLU levels of width `hidden`.

    Args:
        dim, hidden: model width and each level's hidden width.
        chunks: each level's chunk size `C_l` (a positive int) or None (static).
        variant: "chain", "nested" or "independent".
        lr: each level's learning rate `lr_l` (per token: the update is `-lr_l * sum of the chunk's gradients`);
            ignored for static levels.
        learn_lr: make the learning rates outer parameters (`lr = exp(log_lr)`, so they must start > 0).
        online: False makes every level static (layers that carry no online levels).
        level_norm: normalise the input of every chained level after the first (chain and nested variants;
            the module docstring says why). False is the un-normalised chain, kept to show the divergence.
        chain: "residual" (`z_l = z_{l-1} + MLP_l(N(z_{l-1}))`, `y = z_k - x`) or "paper" (Eq. 70 as printed,
            `y = MLP_k(... MLP_1(x))`: no residual, no level norm, `level_norm` unused); chain and nested variants.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        chunks: Sequence[int | None],
        *,
        variant: CMSVariant = "chain",
        lr: Sequence[float],
        learn_lr: bool = False,
        online: bool = True,
        level_norm: bool = True,
        chain: CMSChain = "residual",
    ) -> None:
        super().__init__()
        check_levels(chunks, variant, lr, learn_lr, chain=chain)
        self.chunks = tuple(c if online else None for c in chunks)
        self.variant = variant
        self.level_norm = level_norm
        self.chain = chain
        self.levels = nn.ModuleList(SwiGLU(dim, hidden) for _ in chunks)
        self.online_levels = tuple(i for i, c in enumerate(self.chunks) if c is not None)
        self.fixed_lr = tuple(float(x) for x in lr)  # Python floats: exact in float64 models too
        if learn_lr:
            self.log_lr = nn.Parameter(torch.tensor(self.fixed_lr).log())
        if variant == "independent":
            self.mix = nn.Parameter(torch.full((len(chunks),), 1.0 / len(chunks)))

    # -----------------------------------------------------------------------------------------
    # state

    def init_state(self, batch: int) -> CMSState:
        """The meta-learned initial fast weights of every online level (None for static levels)."""
        out: list[CMSLevel | None] = [None] * len(self.levels)
        for i in self.online_levels:
            lv = self.levels[i]
            w = tuple(_broadcast(m.weight, batch) for m in (lv.gate, lv.up, lv.down))
            zeros = tuple(torch.zeros_like(t) for t in w)
            nested = self._parent(i) is not None
            out[i] = CMSLevel(w, zeros, w if nested else (), zeros if nested else ())
        return CMSState(tuple(out))

    @property
    def lr(self) -> Tensor | tuple[float, ...]:
        """The k learning rates (a `[k]` tensor when they are learnable)."""
        return self.log_lr.exp() if hasattr(self, "log_lr") else self.fixed_lr

    # -----------------------------------------------------------------------------------------
    # forward

    def forward(self, x: Tensor, state: CMSState) -> Tensor:
        """x `[B, T, D]` -> `[B, T, D]` with the weights in force (the state does not change here)."""
        if self.variant == "independent":
            mix = self.mix.to(x.dtype)
            return sum(mix[i] * self._level(i, x, st) for i, st in enumerate(state.levels))
        if self.chain == "paper":  # Eq. 70 as printed: each level reads the previous level's output
            for i, st in enumerate(state.levels):
                x = self._level(i, x, st)
            return x
        z, total = x, torch.zeros_like(x)
        for i, st in enumerate(state.levels):
            d = self._level(i, rms_normalize(z) if i > 0 and self.level_norm else z, st)
            z, total = z + d, total + d
        return total

    def _level(self, i: int, x: Tensor, st: CMSLevel | None) -> Tensor:
        if st is None:
            return self.levels[i](x)
        gate, up, down = (w.to(x.dtype) for w in st.weights)
        h = F.silu(x @ gate.mT) * (x @ up.mT)  # [B, T, h]
        return h @ down.mT

    # -----------------------------------------------------------------------------------------
    # updates (Eq. 71)

    def fast_weights(self, state: CMSState) -> tuple[Tensor, ...]:
        """The tensors the task loss is differentiated against: every online level's weights, in level order
        (`step` takes their gradients in the same order)."""
        return tuple(w for i in self.online_levels for w in self._online(state, i).weights)

    def map_fast_weights(self, state: CMSState, fn: Callable[[Tensor], Tensor]) -> CMSState:
        """The state with `fn` applied to every online level's weights (e.g. to make them differentiable)."""
        levels = list(state.levels)
        for i in self.online_levels:
            st = self._online(state, i)
            # the constructor, not `_replace` (which torch 2.11's dynamo cannot rebuild at a graph break: lm.py)
            levels[i] = CMSLevel(tuple(fn(w) for w in st.weights), st.grads, st.start, st.start_grads)
        return CMSState(tuple(levels))

    def step(self, state: CMSState, grads: Sequence[Tensor], end: int) -> CMSState:
        """Add one segment's gradients (ordered as `fast_weights`) and apply every update due at absolute
        position `end` (the number of tokens read): level l when `end % C_l == 0` (Eq. 71); in the nested
        variant, a level restarts from its (moved) start point when `end` is a boundary of its parent (Eq. 72)."""
        expected = sum(len(self._online(state, i).weights) for i in self.online_levels)
        if len(grads) != expected:
            raise ValueError(f"CMS.step needs {expected} gradients (ordered as fast_weights), got {len(grads)}")
        lr, levels, k = self.lr, list(state.levels), 0
        for i in self.online_levels:
            st = self._online(state, i)
            g = tuple(grads[k : k + len(st.weights)])
            k += len(st.weights)
            levels[i] = self._step_level(i, st, g, end, lr)
        return CMSState(tuple(levels))

    def _step_level(self, i: int, st: CMSLevel, g: Weights, end: int, lr: Tensor | tuple[float, ...]) -> CMSLevel:
        acc, w = _add(st.grads, g), st.weights
        if end % self.chunks[i] == 0:  # type: ignore[operator]
            w, acc = _sub(w, lr[i], acc), _zeros(acc)
        start, sacc = st.start, st.start_grads
        parent = self._parent(i)
        if parent is not None:
            sacc = _add(sacc, g)
            if end % self.chunks[parent] == 0:  # type: ignore[operator]
                start, sacc = _sub(start, lr[parent], sacc), _zeros(sacc)
                w, acc = start, _zeros(acc)
        return CMSLevel(w, acc, start, sacc)

    @staticmethod
    def _online(state: CMSState, i: int) -> CMSLevel:
        st = state.levels[i]
        if st is None:
            raise ValueError(f"CMS level {i} is online but its state is None; start from CMS.init_state")
        return st

    def _parent(self, i: int) -> int | None:
        """The online level whose learning restarts level i (nested variant only)."""
        if self.variant != "nested" or i == 0 or self.chunks[i - 1] is None or self.chunks[i] is None:
            return None
        return i - 1


def check_levels(
    chunks: Sequence[int | None], variant: str, lr: Sequence[float], learn_lr: bool, *, chain: str = "residual"
) -> None:
    """ValueError naming the problem and the fix for a bad CMS level configuration."""
    if variant not in ("chain", "nested", "independent"):
        raise ValueError(f"CMS variant must be 'chain', 'nested' or 'independent', got {variant!r}")
    if chain not in ("residual", "paper"):
        raise ValueError(f"CMS chain must be 'residual' or 'paper', got {chain!r}")
    if chain == "paper" and variant == "independent":
        raise ValueError(
            "the CMS chain form 'paper' composes the levels (chain and nested variants); the independent variant "
            "sums them. Leave the chain form at 'residual' or choose the chain or nested variant"
        )
    if len(chunks) == 0:
        raise ValueError("the CMS needs at least one level; give chunk sizes such as (None, 2048, 512)")
    for c in chunks:
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
            raise ValueError(f"CMS chunk sizes must be positive ints or None (static), got {c!r}")
    if len(lr) != len(chunks):
        raise ValueError(f"give one CMS learning rate per level: {len(chunks)} levels but {len(lr)} rates")
    for x in lr:
        if not (isinstance(x, int | float) and math.isfinite(x) and x >= 0):
            raise ValueError(f"CMS learning rates must be finite and >= 0, got {x!r}")
        if learn_lr and x <= 0:
            raise ValueError("learnable CMS learning rates are exp(log_lr) and must start > 0; set them > 0")
    if variant == "nested":
        for a, b in itertools.pairwise(chunks):
            if a is not None and b is not None and a % b:
                raise ValueError(
                    f"nested CMS: level chunk {a} is not a multiple of the next level's {b}; list levels from "
                    "slow to fast with each chunk size a multiple of the next"
                )


NORM_EPS = 1e-6  # the models' RMSNorm epsilon (ModelConfig.norm_eps)


def rms_normalize(z: Tensor, eps: float = NORM_EPS) -> Tensor:
    """`z / sqrt(mean(z^2) + eps)` over the last dim, computed in float32 or wider and cast back (no weight: the
    next level's gate and up projections already scale every input channel)."""
    zf = state_float(z)
    return (zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + eps)).to(z.dtype)


def _broadcast(weight: Tensor, batch: int) -> Tensor:
    """`[o, i] -> [B, o, i]` (float32 or wider), a view of a copy of the weight: the state outlives the forward
    that built it, and a parameter-sharding wrapper (FSDP2) frees the gathered weight's storage when it reshards,
    so a view of the parameter itself would dangle (a 2-rank FSDP2 run crashed with SIGSEGV). Under no_grad the
    result is detached: a view made there would report `requires_grad` without being part of any graph, and the
    online driver must see that it is not."""
    w = state_float(weight)
    return (w if torch.is_grad_enabled() else w.detach()).clone().expand(batch, -1, -1)


def _add(a: Weights, b: Weights) -> Weights:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _sub(w: Weights, lr: Tensor | float, g: Weights) -> Weights:
    return tuple(x - (lr if isinstance(lr, float) else lr.to(x.dtype)) * y for x, y in zip(w, g, strict=True))


def _zeros(a: Weights) -> Weights:
    return tuple(torch.zeros_like(x) for x in a)
