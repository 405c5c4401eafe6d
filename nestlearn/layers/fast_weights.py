"""Pieces shared by the memory layers (Titans LMM, self-modifying Titans, MAC): learned initial fast weights,
per-head gate read-outs, the gated output and the choice of memory op.

What this is: small modules and helpers. What it is not: a sequence mixer; see `titans.py` and
`self_modifying.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.memory import MemorySpec, MemoryState, memory_auto, memory_chunk, memory_fused, memory_lean, memory_naive
from ..ops.memory.adjoint import memory_adjoint
from ..ops.memory.adjoint import supports as adjoint_supports
from ..ops.memory.common import check_save_every
from .basic import RMSNorm

Impl = Literal["auto", "adjoint", "chunk", "fused", "lean", "naive"]
MemoryOp = Callable[..., tuple[Tensor, MemoryState]]


def memory_op(impl: Impl, save_every: int = 1) -> MemoryOp:
    """ "auto": the GPU path where it applies on CUDA (the linear memory's affine scan, the MLP memory's kernels), else
    the chunk form (`ops/memory/fused.py`); "chunk": the PyTorch chunk form; "fused": the GPU path (the linear
    memory's scan, the MLP memory's kernels; an error where it cannot apply; a call that finishes an open chunk
    takes the chunk form); "lean": the chunk form with a memory-lean backward (`ops/memory/lean.py`: a third of the
    memory, two thirds of the speed, measured on the H200); "adjoint": the MLP memory's hand-derived backward
    (`ops/memory/adjoint.py`: chunk-start states only, no autograd inside the chunk loop; the chunk form where it
    does not apply: the branch norm, the linear memory); "naive": the per-token float64 reference. All
    compute the same function. `save_every`: the chunk-start states the MLP memory's written-out backward keeps
    ("auto", "fused", "adjoint"; `adjoint.memory_adjoint`): every chunk's (1), every n-th, or none (0), the rest
    recomputed in the backward; the other paths ignore it."""
    ops = {"auto": memory_auto, "adjoint": _adjoint, "chunk": memory_chunk, "fused": _fused, "lean": _lean,
           "naive": memory_naive}  # fmt: skip
    if impl not in ops:
        raise ValueError(f"memory impl must be one of {', '.join(map(repr, ops))}, got {impl!r}")
    check_save_every(save_every)
    if impl in ("auto", "fused", "adjoint") and save_every != 1:
        return functools.partial(ops[impl], save_every=save_every)
    return ops[impl]


def twice_differentiable(impl: Impl) -> MemoryOp:
    """The op of `impl` whose output can be differentiated twice (full meta-gradients through online CMS updates):
    the custom ops of "fused" and "lean" have first-order backward formulas only, so those (and "auto") take the
    chunk form, which is plain tensor code; "chunk" and "naive" are twice differentiable as they are."""
    return memory_naive if impl == "naive" else memory_chunk


def _from_chunk_boundary(op: MemoryOp) -> MemoryOp:
    """`op` for calls that start at a chunk boundary; a call that finishes an open chunk (decoding) takes the chunk
    form (the fused and lean paths start at boundaries)."""

    def run(*args: object, state: MemoryState, **kwargs: object) -> tuple[Tensor, MemoryState]:
        if state.offset == 0:
            return op(*args, state=state, **kwargs)
        return memory_chunk(*args, state=state, **_without_save_every(kwargs))

    return run


_fused, _lean = _from_chunk_boundary(memory_fused), _from_chunk_boundary(memory_lean)


def _adjoint(*args: object, state: MemoryState, spec: MemorySpec, **kwargs: object) -> tuple[Tensor, MemoryState]:
    """`memory_adjoint` where it applies (`adjoint.supports`), else the chunk form."""
    if adjoint_supports(spec, state):
        return memory_adjoint(*args, state=state, spec=spec, **kwargs)
    return memory_chunk(*args, state=state, spec=spec, **_without_save_every(kwargs))


def _without_save_every(kwargs: dict[str, object]) -> dict[str, object]:
    """The chunk form's arguments: `save_every` (the written-out backward's) dropped."""
    return {k: v for k, v in kwargs.items() if k != "save_every"}


class MemoryInit(nn.Module):
    """Meta-learned initial fast weights of `count` memories with `heads` heads each (D1, D7).

    Weights are parameters `[count * heads, d_out, d_in]` ~ N(0, 1/d_in); momenta start at zero. `state(B)`
    broadcasts them over the batch, so the outer loss's gradients reach them through every inner update.
    """

    def __init__(self, spec: MemorySpec, count: int, heads: int, dim: int) -> None:
        super().__init__()
        self.spec, self.heads = spec, count * heads
        shapes = spec.weight_shapes(dim)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(self.heads, o, i) / math.sqrt(i)) for o, i in shapes)

    def state(self, batch: int) -> MemoryState:
        weights = tuple(state_float(w).expand(batch, -1, -1, -1) for w in self.weights)
        momenta = tuple(torch.zeros_like(w) for w in weights)
        return MemoryState(weights, momenta, weights, 0)

    def select(self, index: int, heads: int) -> tuple[Tensor, ...]:
        """Initial weights `[heads, o, i]` of memory number `index`."""
        return tuple(w[index * heads : (index + 1) * heads] for w in self.weights)


class GateHead(nn.Module):
    """Per-head scalar gates from `[B, T, D]` (static projection): `scale * sigmoid(x W + b)` in [0, scale].

    `init` is the sigmoid's starting value (through the bias); `scale <= 1` keeps the gate in [0, 1] (D6).
    """

    def __init__(self, dim: int, heads: int, init: float, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(dim, heads)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.constant_(self.proj.bias, logit(init))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.sigmoid(state_float(self.proj(x)))  # [B, T, H]


def step_scale(*chunk_sizes: int) -> float:
    """Largest inner step size: `1 / C` for the largest chunk (docs/decisions.md).

    The chunk form sums the C gradients frozen at the chunk start (Eq. 91), so one chunk moves the weights by
    about `C * eta` times a single token's step; keeping `eta <= 1 / C` keeps that bounded. With C = 1 the gate
    spans all of [0, 1].
    """
    return 1.0 / max(chunk_sizes)


ETA_START = 0.1  # every eta gate starts at a tenth of the 1 / C cap (docs/decisions.md)


def eta_gate(*chunk_sizes: int, cap: bool = True) -> tuple[float, float]:
    """`(start, scale)` of an eta gate `scale * sigmoid(z + logit(start))`, z the gate's learned input.

    Capped (C1, the default): `scale = step_scale(*chunk_sizes) = 1 / C`, so eta spans [0, 1 / C], and the
    sigmoid starts at `ETA_START`. Uncapped (`cap=False`, the paper's form, `ModelConfig(eta_cap=False)`):
    `scale = 1`, so eta spans [0, 1], and the sigmoid starts at `ETA_START / C`. Both start at the same step
    size `ETA_START / C` (at `z = 0`; only the gate's bias differs), so the initial model is the same under both.
    """
    cap_value = step_scale(*chunk_sizes)
    return (ETA_START, cap_value) if cap else (ETA_START * cap_value, 1.0)


class GatedOutput(nn.Module):
    """`W_o (RMSNorm_head(o) ⊙ silu(x W_g))`: output norm and gate before the projection (Titans §3.3)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(dim // heads)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, o: Tensor, x: Tensor) -> Tensor:
        """o `[B, T, H, d]`, x `[B, T, D]` -> `[B, T, D]`."""
        o = self.norm(o.to(x.dtype)).flatten(2)
        return self.out(o * F.silu(self.gate(x)))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """`[B, T, H*d] -> [B, T, H, d]`."""
    return x.reshape(*x.shape[:2], heads, x.shape[-1] // heads)


def state_float(x: Tensor) -> Tensor:
    """float64 stays float64; everything else becomes float32 (D8: fast weights and gates in float32)."""
    return x if x.dtype == torch.float64 else x.float()


def l2norm(x: Tensor) -> Tensor:
    """Unit vectors over the last dim (D6: queries and keys), computed in float32 or wider."""
    return F.normalize(state_float(x), dim=-1)


def logit(p: float) -> float:
    """Inverse sigmoid, for gate biases that start at probability p."""
    return math.log(p / (1 - p))
