"""Shared conventions of the deep-memory op: configuration, state, input checks, activations.

What this is: the types and small tensor helpers that both `naive.py` (the per-token reference) and
`chunk.py` (the chunk-parallel form) use, so the two agree on every convention of decisions D1-D5.
What it is not: an nn.Module or anything that owns parameters; layers build on these functions.

Conventions (column vectors, as in the paper):
- a memory weight is stored `[B, H, d_out, d_in]` and acts as `y = W x` (D1: per sequence, per head);
- linear memory `M(x) = W x`; residual MLP memory `M(x) = x + W1 σ(W2 x)` (Eq. 89), `W1: [d, e]`,
  `W2: [e, d]`, `e = expansion * d` (D2);
- inner objectives (D3): L2 `l = 1/2 ||M(k) - v||^2`, so `dl/dy = M(k) - v`; dot product
  `l = -<M(k), v>`, so `dl/dy = -v` (plain gradient descent on it writes `+eta v k^T`; Eq. 92 prints the
  opposite sign, which would be gradient ascent).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

MemoryKind = Literal["linear", "mlp"]
Objective = Literal["l2", "dot"]
Activation = Literal["silu", "gelu", "tanh"]


@dataclass(frozen=True, kw_only=True)
class MemorySpec:
    """What memory is learned in context and how (D2-D4).

    kind: "linear" (`W x`) or "mlp" (`x + W1 σ(W2 x)`, Eq. 89).
    objective: "l2" (`1/2 ||M(k) - v||^2`, Eq. 86) or "dot" (`-<M(k), v>`).
    activation: σ of the MLP memory.
    expansion: hidden width of the MLP memory as a multiple of the head dim.
    dgd: apply the DGD projector `(alpha I - eta x̂ x̂^T)` (Eq. 88); False is plain GD with decay (Titans).
    momentum: keep a momentum `S_t = beta_t S_{t-1} - eta_t G_t`; False means `beta = 0`.
    decay: use the retention gate `alpha_t`; False means `alpha = 1`.
    out_norm: Titans' memory `x + LN(W1 σ(W2 x))` (Titans §3.3): a LayerNorm without affine parameters on the
        residual branch (MLP memory only). Its scale invariance keeps the inner steps from growing with the
        weights. Off for HOPE's memories (Eq. 89 has none).
    self_values: the target of token t is `v_hat_t = M(v_t)`, the memory applied to the given value at the
        chunk-start state (self-generated values, Eqs. 84 / 91); False uses `v_t` itself.
    norm_eps: `x̂ = x / sqrt(||x||^2 + norm_eps^2)` for the projector's normalised layer input.
    max_grad_norm: clip each token's inner gradient `G_t` (all weights together) to this Frobenius norm,
        `G_t <- G_t * c / max(c, ||G_t||)`, before it enters the momentum; None leaves it unclipped. It bounds
        every token's write, so the fast weights grow at most linearly instead of diverging when a chunk's
        frozen gradients overshoot (plain GD on an MLP memory; docs/decisions.md).
    """

    kind: MemoryKind = "mlp"
    objective: Objective = "l2"
    activation: Activation = "silu"
    expansion: int = 4
    dgd: bool = True
    momentum: bool = True
    decay: bool = True
    out_norm: bool = False
    self_values: bool = False
    norm_eps: float = 1e-6
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"MemorySpec.kind must be 'linear' or 'mlp', got {self.kind!r}")
        if self.objective not in ("l2", "dot"):
            raise ValueError(f"MemorySpec.objective must be 'l2' or 'dot', got {self.objective!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"MemorySpec.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.expansion, int) or self.expansion < 1:
            raise ValueError(f"MemorySpec.expansion must be a positive int, got {self.expansion!r}")
        if self.out_norm and self.kind != "mlp":
            raise ValueError("MemorySpec.out_norm needs kind='mlp' (it normalises the MLP's residual branch)")
        if not self.norm_eps > 0:
            raise ValueError(f"MemorySpec.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"MemorySpec.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")

    def weight_shapes(self, dim: int) -> tuple[tuple[int, int], ...]:
        """Shapes `(d_out, d_in)` of the fast weights, in state order: linear (W,), mlp (W1, W2)."""
        if self.kind == "linear":
            return ((dim, dim),)
        hidden = self.expansion * dim
        return ((dim, hidden), (hidden, dim))


class MemoryState(NamedTuple):
    """Fast weights and their momenta, each `[B, H, d_out, d_in]`, in `MemorySpec.weight_shapes` order.

    A call may end inside a chunk; the next call then finishes that chunk exactly as one long call would
    (D5, D12): `offset` counts the tokens of the current chunk already processed and `anchor` holds the
    weights at that chunk's start, at which the rest of its gradients (and self-generated values) are taken.
    `anchor = ()` means "the current weights" and is only valid with `offset = 0`. The ops always return
    a full anchor (the current weights when `offset = 0`), so a state's structure never changes.
    """

    weights: tuple[Tensor, ...]
    momenta: tuple[Tensor, ...]
    anchor: tuple[Tensor, ...] = ()
    offset: int = 0

    def map(self, fn: Callable[[Tensor], Tensor]) -> MemoryState:
        """The same state with `fn` applied to every tensor (e.g. `.float()`, `.to(device)`, `.detach()`)."""
        return MemoryState(*(tuple(fn(t) for t in ts) for ts in self[:3]), self.offset)

    def frozen(self) -> tuple[Tensor, ...]:
        """The weights at the current chunk's start (Eqs. 90-91)."""
        return self.anchor if self.offset > 0 else self.weights


def init_state(
    spec: MemorySpec,
    batch: int,
    heads: int,
    dim: int,
    *,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> MemoryState:
    """A fresh state: weights ~ N(0, std^2) (default `1/sqrt(d_in)`), momenta zero.

    Layers instead hold a learned `[H, d_out, d_in]` initial state and `expand` it over the batch (D1).
    """
    weights, momenta = [], []
    for d_out, d_in in spec.weight_shapes(dim):
        scale = std if std is not None else 1.0 / math.sqrt(d_in)
        w = torch.randn(batch, heads, d_out, d_in, dtype=dtype, device=device, generator=generator)
        weights.append(w * scale)
        momenta.append(torch.zeros(batch, heads, d_out, d_in, dtype=dtype, device=device))
    return MemoryState(tuple(weights), tuple(momenta))


# ---------------------------------------------------------------------------------------------
# activations with their derivatives (the frozen inner gradient needs σ'; outer gradients
# differentiate through it, so both are written with differentiable torch ops)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def _tanh_grad(z: Tensor) -> Tensor:
    return 1 - torch.tanh(z) ** 2


_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "silu": (torch.nn.functional.silu, _silu_grad),
    "gelu": (torch.nn.functional.gelu, _gelu_grad),
    "tanh": (torch.tanh, _tanh_grad),
}


def activation(name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """`(σ, σ')` for an activation name of `MemorySpec`."""
    return _ACTIVATIONS[name]


def memory_apply(weights: tuple[Tensor, ...] | list[Tensor], x: Tensor, spec: MemorySpec) -> Tensor:
    """`M(x)` without any update: `W x` (linear) or `x + W1 σ(W2 x)` (Eq. 89).

    Shapes: weights `[B, H, d_out, d_in]`; x `[B, H, n, D]` -> `[B, H, n, D]`.
    """
    if spec.kind == "linear":
        return x @ weights[0].mT
    sigma, _ = activation(spec.activation)
    w1, w2 = weights
    return x + branch_norm(sigma(x @ w2.mT) @ w1.mT, spec)


LN_EPS = 1e-5


def branch_norm(a: Tensor, spec: MemorySpec) -> Tensor:
    """The residual branch's output: `LN(a)` (mean 0, variance 1, no affine) when `spec.out_norm`, else `a`."""
    if not spec.out_norm:
        return a
    mu = a.mean(-1, keepdim=True)
    return (a - mu) * torch.rsqrt(a.var(-1, unbiased=False, keepdim=True) + LN_EPS)


def branch_norm_grad(a: Tensor, g: Tensor, spec: MemorySpec) -> Tensor:
    """`dl/da` from `g = dl/d branch_norm(a)`: `(g - mean(g) - n mean(g n)) / s` with `n = LN(a)` (identity if off)."""
    if not spec.out_norm:
        return g
    inv = torch.rsqrt(a.var(-1, unbiased=False, keepdim=True) + LN_EPS)
    n = (a - a.mean(-1, keepdim=True)) * inv
    return inv * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))


def normalize(x: Tensor, eps: float) -> Tensor:
    """`x / sqrt(||x||^2 + eps^2)` over the last dim: smooth, and finite for `x = 0`."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps * eps)


def clip_factor(sq_norm: Tensor, spec: MemorySpec) -> Tensor:
    """`c / max(c, ||G_t||)` from `sq_norm = ||G_t||^2` (any shape), or 1 when `spec.max_grad_norm` is None.

    Written with the max under the square root, so a zero gradient has a finite derivative.
    """
    if spec.max_grad_norm is None:
        return torch.ones_like(sq_norm)
    c = spec.max_grad_norm
    return c * torch.rsqrt(sq_norm.clamp_min(c * c))


def output_grad(y: Tensor, v: Tensor, objective: str) -> Tensor:
    """`dl/dy` of the inner objective (D3): L2 -> `y - v`, dot -> `-v`."""
    return y - v if objective == "l2" else -v


# CPU float32 states are flushed of subnormal floats at every chunk boundary (`flush_subnormals`); tests switch
# it off to show what it removes.
FLUSH_SUBNORMALS = True
_TINY32 = torch.finfo(torch.float32).tiny


def flush_subnormals(ts: list[Tensor]) -> list[Tensor]:
    """The state tensors with every subnormal float32 entry (`0 < |x| < 1.18e-38`) set to 0, on CPU only.

    Why: a retention gate `alpha < 1` decays the fast weights geometrically (at the initial gates of an
    untrained HOPE they reach 1e-36 after 8K tokens), and round to nearest keeps the smallest subnormals fixed
    under any decay factor above 1/2 (a chunk's `alpha^C`: 0.99^64 = 0.53), so they never reach 0: 44 % of the
    debug HOPE's memory state after 16K tokens. CPUs handle subnormal operands in slow paths (on the 2-core
    AMD EPYC: silu, sigmoid, exp and division 1.7-2.7x slower; matmuls not; docs/results/denormals.md).
    `torch.set_flush_denormal` is no substitute: it sets the calling thread only (intra-op workers started
    earlier keep their mode) and changes float64 too. GPUs compute subnormals at full speed and float64 states
    (the reference) are never touched; the result changes only by the flushed values (each below 1.18e-38), and
    their outer gradient becomes 0. NaN and inf are kept.
    """
    if not FLUSH_SUBNORMALS:
        return ts
    return [t.masked_fill(t.abs() < _TINY32, 0.0) if _flushable(t) else t for t in ts]


def _flushable(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (D8: fast weights and accumulations in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------------------
# input checks shared by every implementation


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    alpha: Tensor | None,
    beta: Tensor | None,
    state: MemoryState,
    spec: MemorySpec,
    chunk_size: int,
    check_gates: bool,
) -> tuple[Tensor, Tensor]:
    """Raise ValueError naming the bad argument; return `(alpha, beta)` with switched-off gates filled.

    Shapes: q, k, v `[B, T, H, D]`; eta, alpha, beta `[B, T, H]`; state as `MemorySpec.weight_shapes`.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("eta", eta)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move all inputs to one device")
    B, T, H, D = q.shape
    if T == 0:
        raise ValueError("q has an empty time axis (T = 0); pass at least one token")
    gates = {"eta": eta, "alpha": alpha, "beta": beta}
    switches = {"alpha": ("decay", spec.decay), "beta": ("momentum", spec.momentum)}
    for name, (flag, on) in switches.items():
        if on and gates[name] is None:
            raise ValueError(f"{name} is required when spec.{flag} is True (or set spec.{flag}=False)")
        if not on and gates[name] is not None:
            raise ValueError(f"{name} was given but spec.{flag} is False; pass {name}=None")
    for name, g in gates.items():
        if g is None:
            continue
        if g.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
        if not g.is_floating_point() or g.device != q.device:
            raise ValueError(f"{name} must be a floating-point tensor on {q.device}")
        if check_gates and not bool(((g >= 0) & (g <= 1)).all()):  # NaN fails too
            lo, hi = float(g.min()), float(g.max())
            raise ValueError(f"{name} must lie in [0, 1] (D4), got values in [{lo:.4g}, {hi:.4g}]")
    _check_state(state, spec, B, H, D, q.device, chunk_size)
    alpha = alpha if alpha is not None else torch.ones_like(eta)
    beta = beta if beta is not None else torch.zeros_like(eta)
    return alpha, beta


def _check_state(
    state: MemoryState, spec: MemorySpec, B: int, H: int, D: int, device: torch.device, chunk_size: int
) -> None:
    if not isinstance(state, MemoryState):
        raise ValueError(f"state must be a MemoryState, got {type(state).__name__}")
    if not isinstance(state.offset, int) or not 0 <= state.offset < chunk_size:
        raise ValueError(
            f"state.offset must be an int in [0, chunk_size = {chunk_size}), got {state.offset!r}; "
            "a state must be continued with the chunk size it was produced with"
        )
    if state.offset > 0 and not state.anchor:
        raise ValueError("state.offset > 0 needs state.anchor, the weights at the current chunk's start")
    shapes = spec.weight_shapes(D)
    fields = ("weights", "momenta", "anchor") if state.anchor else ("weights", "momenta")
    for field in fields:
        tensors = getattr(state, field)
        if len(tensors) != len(shapes):
            raise ValueError(
                f"state.{field} has {len(tensors)} tensors but a {spec.kind!r} memory needs {len(shapes)}; "
                "the state comes from another memory configuration"
            )
        for i, (t, (d_out, d_in)) in enumerate(zip(tensors, shapes, strict=True)):
            want = (B, H, d_out, d_in)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"state.{field}[{i}] must be {want} for this spec and input, got {tuple(t.shape)}; "
                    "the state comes from another configuration (kind, expansion, heads, head dim or batch)"
                )
            if t.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"state.{field}[{i}] must be float32 or float64 (D8), got {t.dtype}")
            if t.device != device:
                raise ValueError(f"state.{field}[{i}] is on {t.device} but the inputs are on {device}")


# ---------------------------------------------------------------------------------------------
# where the Triton kernels can run

# Triton is optional: CPU machines without it use the PyTorch chunk form. It is imported only when a kernel runs.
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def check_save_every(value: object, name: str = "save_every") -> None:
    """Refuse a `save_every` (which chunk-start states the written-out backward keeps) that is not an int >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (1: every chunk's start; n: every n-th; 0: none), got {value!r}")


def no_autocast(like: Tensor) -> torch.autocast:
    """Autocast off on `like`'s device, for the inside of the custom ops whose backward recomputes their forward
    (`adjoint.py`, `lean.py`): under a caller's bf16 autocast the forward's matrix products (the gate products'
    included) would come out in bf16 while the backward, on a thread without autocast, recomputes them in float32,
    i.e. the gradient of another function (and the kernels would take bf16 inputs). Inside, they compute in the
    compute dtype (D8)."""
    return torch.autocast(like.device.type, enabled=False)


def triton_available(device: torch.device, interpret: bool = False) -> bool:
    """Whether a kernel can run on `device`: Triton installed, and CUDA, or with `interpret` Triton's interpreter
    on CPU tensors (`TRITON_INTERPRET=1` set before Triton compiles the kernel: the tests' way)."""
    if not HAVE_TRITON:
        return False
    return device.type == "cuda" or (interpret and os.environ.get("TRITON_INTERPRET") == "1")


# ---------------------------------------------------------------------------------------------
# what the ops registered with torch.library share (lean.py, adjoint.py)

SPEC_ARG_NAMES = ("kind", "objective", "activation", "expansion", "dgd", "momentum", "decay", "out_norm",
                  "self_values", "norm_eps", "max_grad_norm")  # fmt: skip


def spec_args(spec: MemorySpec) -> tuple[Any, ...]:
    """`spec` as plain values in `SPEC_ARG_NAMES`' order: custom ops take those, not dataclasses."""
    return tuple(getattr(spec, name) for name in SPEC_ARG_NAMES)


def spec_from_args(*args: Any) -> MemorySpec:
    """The spec from `spec_args`' tuple."""
    return MemorySpec(**dict(zip(SPEC_ARG_NAMES, args, strict=True)))


def fresh(ts: tuple[Tensor, ...] | list[Tensor]) -> list[Tensor]:
    """Copies: a custom op's outputs may not alias its inputs or each other (a state may hand a tensor back)."""
    return [t.clone() for t in ts]


@contextlib.contextmanager
def autograd_inside_op() -> Iterator[None]:
    """Autograd back on inside a custom op's implementation, which the dispatcher runs with the autograd keys
    excluded (a backward op that differentiates part of its computation by autograd). Uses the dispatcher's
    thread-local key sets (`torch._C`), restored on exit."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield
