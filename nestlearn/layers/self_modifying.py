"""Self-modifying Titans (Eqs. 83-93): the projections that make keys, values, learning rates and retention
gates are themselves memories updated in context, each on values it generates for itself.

What this is: `SelfModifyingTitans`, `[B, T, D] -> [B, T, D]` with an explicit state. Per head (D6):

    u_t = silu(conv(x W_u))_h,  q_t = l2norm(silu(conv(x W_q))_h)             static input and query
    k_t = l2norm(M_k(u_t)),  v_t = l2norm(M_v(u_t))                              Eq. 83 (v normalised: see below)
    eta_t = sigmoid(r_eta · M_eta(u_t) + b_eta) / max(C_mem, C_proj)           step size (see step_scale;
                                                                                 no divisor with eta_cap=False)
    alpha_t = sigmoid(r_alpha · M_alpha(u_t) + b_alpha)                          retention
    beta_t = sigmoid(x W_beta + b_beta)                                          momentum gate (static)
    v_hat_{□,t} = M_□(v_t)                                                       Eq. 84
    M_□ <- DGD step on 1/2 ||M_□(k_t) - v_hat_{□,t}||^2 with eta, alpha, beta    Eqs. 85-88, □ ∈ {k, v, eta, alpha, mem}
    o_t = M_mem(q_t),  y_t = W_o(RMSNorm(o_t) ⊙ silu(x W_g))                   Eq. 94, Titans §3.3

Chunking (D5, Eqs. 90-91): the k/v/eta/alpha memories run in chunks of `C_proj`: everything a chunk needs is
generated from their state at the end of the previous chunk, then all of them are updated over the chunk at
once (stacked as extra heads of one memory-op call). The main memory then runs over the whole call in chunks
of `C_mem`. A state that ends inside a chunk keeps that chunk's start (`MemoryState.anchor`), so one pass,
pieces and token-by-token decoding agree. With `save_every` n != 1 the projection loop runs in segments of n
chunks (0: one segment) under activation checkpointing when gradients are recorded (first-order only: a
second-order call keeps everything): the backward keeps each segment's start state and input and recomputes its
chunks, instead of keeping every chunk's P memory states and the generation's intermediates (the main memory
keeps every n-th chunk start: `adjoint.memory_adjoint`).
Ablations (Table 6): `adaptive_k` / `adaptive_v` False freeze that memory at its meta-learned initial state
("moved to the lowest-frequency level"); `adaptive_q` True replaces the static query by a memory `M_q(u_t)`;
the spec's `dgd` / `momentum` / `decay` switches apply to every memory.
Values are L2-normalised too (`normalize_v`, default on; docs/decisions.md): the targets `M_□(v_t)` are made
by the memories themselves, and with an unbounded `v` the loop `v -> M_v -> v` grows without limit (NaN within
256 random tokens once eta is at half its cap; `test_default_gates_stay_bounded`).
Compiled step (`compile_step`): each whole chunk's generation and update is one function of tensors
(`_project_chunk`) that `torch.compile` turns into a few fused kernels each way, the same for every layer.
What it is not: a fused kernel; the loop over `C_proj` chunks runs in Python (one compiled call per chunk).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch._functorch.config
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only
from torch.utils.checkpoint import checkpoint

from ..ops.memory import MemorySpec, MemoryState, memory_chunk
from ..ops.memory.common import memory_apply, no_autocast
from .basic import ShortConv
from .fast_weights import (
    GatedOutput,
    GateHead,
    Impl,
    MemoryInit,
    MemoryOp,
    eta_gate,
    l2norm,
    logit,
    memory_op,
    split_heads,
    state_float,
    twice_differentiable,
)


class SelfModState(NamedTuple):
    """Short-conv inputs `[B, width-1, 2D]` (`D` with an adaptive query), the stacked projection memories
    `[B, P*H, ...]` and the main memory `[B, H, ...]`."""

    conv: Tensor
    proj: MemoryState
    memory: MemoryState


class SelfModifyingTitans(nn.Module):
    """Self-modifying Titans layer.

    Args:
        dim, heads: model width and head count; every memory acts on `d = dim // heads` (D6).
        spec: memory kind and inner optimizer switches for all memories (`self_values` is set here).
        mem_chunk, proj_chunk: `C_mem` for the main memory, `C_proj` for the projection memories (D5).
        adaptive_k, adaptive_v, adaptive_q: which projections learn in context (Table 6 ablations).
        normalize_v: L2-normalise the generated values (see the module docstring).
        eta_cap: eta is capped at `1 / max(C_mem, C_proj)` (C1, the default); False: the sigmoid itself, spanning
            [0, 1] as in the paper, with `b_eta` set so that eta starts at the same value (`fast_weights.eta_gate`).
        impl: the memory op (`fast_weights.memory_op`: "auto", "adjoint", "chunk", "fused", "lean", "naive";
            one function).
        save_every: what the backward keeps: every chunk's states (1); with n > 1 the main memory's every n-th
            chunk start (`fast_weights.memory_op`) and the projection loop's state every n chunks, its segments
            recomputed under checkpointing (any impl); 0: the call's input states only.
        compile_step: the projection step of every whole chunk runs under `torch.compile` (`_compiled_step`:
            compiled at its first call, shared by the layers of one configuration; the chunk form with autocast
            off inside, whatever `impl`); first-order calls only (a `second_order` call runs eagerly).
        compile_budget: torch's `activation_memory_budget` for that compile (1: its default; lower keeps less for
            the backward and recomputes the rest there).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        spec: MemorySpec,
        mem_chunk: int,
        proj_chunk: int,
        adaptive_k: bool = True,
        adaptive_v: bool = True,
        adaptive_q: bool = False,
        normalize_v: bool = True,
        eta_cap: bool = True,
        conv_width: int = 4,
        impl: Impl = "auto",
        save_every: int = 1,
        compile_step: bool = False,
        compile_budget: float = 1.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_model = {dim} is not divisible by n_heads = {heads}; pick a head count dividing it")
        for name, c in (("mem_chunk", mem_chunk), ("proj_chunk", proj_chunk)):
            if not isinstance(c, int) or c < 1:
                raise ValueError(f"{name} must be a positive int, got {c!r}")
        self.heads, self.head_dim = heads, dim // heads
        self.spec = dataclasses.replace(spec, self_values=True)
        self.mem_chunk, self.proj_chunk, self.normalize_v = mem_chunk, proj_chunk, normalize_v
        self.impl, self.op, self.save_every = impl, memory_op(impl, save_every), save_every
        self.names = ["k", "v", "q", "eta", "alpha"] if adaptive_q else ["k", "v", "eta", "alpha"]
        if not self.spec.decay:
            self.names.remove("alpha")  # "w/o weight decay": no retention gate, no memory to make it
        self.adaptive = [n for n in self.names if {"k": adaptive_k, "v": adaptive_v}.get(n, True)]
        self.static = [n for n in self.names if n not in self.adaptive]
        d = self.head_dim
        self.in_proj = nn.Linear(dim, dim if adaptive_q else 2 * dim, bias=False)  # u (and q when static)
        self.conv = ShortConv(self.in_proj.out_features, conv_width)
        self.beta = GateHead(dim, heads, init=0.5) if self.spec.momentum else None
        self.readout = nn.ParameterDict(
            {n: nn.Parameter(0.02 * torch.randn(heads, d)) for n in ("eta", "alpha") if n in self.names}
        )
        eta_start, self.eta_scale = eta_gate(mem_chunk, proj_chunk, cap=eta_cap)  # a tenth of the cap at start
        bias = {"eta": logit(eta_start), "alpha": logit(0.99)}
        self.readout_bias = nn.ParameterDict(
            {n: nn.Parameter(torch.full((heads,), bias[n])) for n in ("eta", "alpha") if n in self.names}
        )
        self.proj_init = MemoryInit(self.spec, len(self.adaptive), heads, d)
        self.static_init = MemoryInit(self.spec, len(self.static), heads, d) if self.static else None
        self.mem_init = MemoryInit(self.spec, 1, heads, d)
        self.output = GatedOutput(dim, heads)
        self.compile_step, self.compile_budget = compile_step, compile_budget

    @property
    def plan(self) -> _Plan:
        """The projection step's constants, read from the layer's attributes at each call."""
        return _Plan(tuple(self.adaptive), tuple(self.readout), self.normalize_v, self.eta_scale, self.spec,
                     self.proj_chunk, self.compile_budget)  # fmt: skip

    def init_state(self, batch: int) -> SelfModState:
        conv = self.conv.initial_state(batch, self.in_proj.weight)
        return SelfModState(conv, self.proj_init.state(batch), self.mem_init.state(batch))

    def forward(
        self, x: Tensor, state: SelfModState | None = None, *, second_order: bool = False
    ) -> tuple[Tensor, SelfModState]:
        """x `[B, T, D]` -> `[B, T, D]`, state carried (D12). `second_order`: the output will be differentiated
        twice (the memories then run a twice-differentiable op, `fast_weights.twice_differentiable`)."""
        op = twice_differentiable(self.impl) if second_order else self.op
        state = state if state is not None else self.init_state(x.shape[0])
        h, conv = self.conv(self.in_proj(x), state.conv)
        parts = [state_float(split_heads(t, self.heads)).transpose(1, 2) for t in h.split(x.shape[-1], dim=-1)]
        u = parts[0]  # [B, H, T, d]
        beta = self.beta(x) if self.beta is not None else None
        recompute = self.save_every != 1 and torch.is_grad_enabled() and not second_order
        # the compiled step trains: no-grad calls (evaluation, generation) and an outer torch.compile's trace, which
        # covers the loop itself, run the eager one
        compiled = self.compile_step and not second_order and torch.is_grad_enabled()
        compiled = compiled and not torch.compiler.is_compiling()
        gen, proj = self._project(u, beta, state.proj, op, compiled, self.save_every if recompute else None)
        q = gen["q"] if "q" in gen else parts[1]
        q, k = l2norm(q).transpose(1, 2), gen["k"].transpose(1, 2)  # [B, T, H, d]
        args = dict(state=state.memory, spec=self.spec, chunk_size=self.mem_chunk)
        o, memory = op(q, k, gen["v"].transpose(1, 2), gen["eta"], gen.get("alpha"), beta, **args)
        return self.output(o, x), SelfModState(conv, proj, memory)

    # -----------------------------------------------------------------------------------------
    # the projection memories: a sequential loop over C_proj chunks

    def _project(
        self,
        u: Tensor,
        beta: Tensor | None,
        proj: MemoryState,
        op: MemoryOp,
        compiled: bool,
        segment: int | None = None,
    ) -> tuple[dict[str, Tensor], MemoryState]:
        """Generated k `[B, H, T, d]` (normalised), v, q (if adaptive) `[B, H, T, d]`, eta, alpha `[B, T, H]`.
        `compiled`: full chunks take the compiled step (`_compiled_step`). `segment`: chunks per checkpointed
        segment (0: all; None: no checkpointing, every chunk's state kept)."""
        static = self._static(u)
        if segment is None:
            return self._chunks(u, beta, static, proj, op, compiled)
        ends = _chunk_ends(u.shape[2], self.proj_chunk, proj.offset)
        cuts = [0, *ends[segment - 1 :: segment]] if segment else [0]
        cuts += [] if cuts[-1] == u.shape[2] else [u.shape[2]]
        pieces = []
        for lo, hi in itertools.pairwise(cuts):
            part = (u[:, :, lo:hi], None if beta is None else beta[:, lo:hi],
                    {name: g[:, :, lo:hi] for name, g in static.items()})  # fmt: skip
            gen, proj = checkpoint(self._chunks, *part, proj, op, compiled, use_reentrant=False)
            pieces.append(gen)
        return _cat_time(pieces), proj

    def _chunks(
        self,
        u: Tensor,
        beta: Tensor | None,
        static: dict[str, Tensor],
        proj: MemoryState,
        op: MemoryOp,
        compiled: bool = False,
    ) -> tuple[dict[str, Tensor], MemoryState]:
        """The loop over `C_proj` chunks: generate each chunk's projections from the chunk-start state, then
        update the memories over it (`_project_chunk`). With `compiled`, every chunk that starts at a boundary
        and is whole takes the compiled step; the others (a call's last short chunk, decoding) run eagerly."""
        # comprehensions, not dict(ParameterDict): dynamo traces these, and dict() of a ParameterDict broke an outer
        # torch.compile's graph nine times (`test_compiled_step_only_where_it_trains`)
        readout = ({name: p for name, p in self.readout.items()}, {name: p for name, p in self.readout_bias.items()})
        plan = self.plan
        eager = functools.partial(_project_chunk, plan=plan, op=op)
        pieces: list[dict[str, Tensor]] = []
        for lo, hi in itertools.pairwise([0, *_chunk_ends(u.shape[2], plan.chunk, proj.offset)]):
            part = (u[:, :, lo:hi], None if beta is None else beta[:, lo:hi],
                    {name: g[:, :, lo:hi] for name, g in static.items()})  # fmt: skip
            if compiled and proj.offset == 0 and hi - lo == plan.chunk:
                part = tree_map_only(Tensor, Tensor.contiguous, part)  # strides independent of the call's length
                gen, proj = _run_compiled(plan, (*part, _uniform(proj), *readout), eager)
            else:
                gen, proj = eager(*part, proj, *readout)
            pieces.append(gen)
        return _cat_time(pieces), proj

    def _static(self, u: Tensor) -> dict[str, Tensor]:
        """Frozen memories read with their meta-learned initial weights, for all tokens at once."""
        out = {}
        for i, name in enumerate(self.static):
            init = self.static_init.select(i, self.heads)
            out[name] = memory_apply(
                tuple(state_float(w)[None].expand(u.shape[0], -1, -1, -1) for w in init), u, self.spec
            )
        return out


# ---------------------------------------------------------------------------------------------
# one projection chunk, as a pure function of tensors (so that one compiled version serves every layer)


class _Plan(NamedTuple):
    """What a layer's projection step is, besides tensors, and how it compiles (hashable: the compiled step's
    cache key; its values are constants of the traced function, so that another plan is another compile)."""

    adaptive: tuple[str, ...]  # the memories updated in context, stacked as P * H heads in this order
    readouts: tuple[str, ...]  # the generated per-head scalars (eta, alpha)
    normalize_v: bool
    eta_scale: float
    spec: MemorySpec
    chunk: int  # C_proj
    budget: float  # AOTAutograd's activation memory budget for the compile (`compile_budget`)


def _project_chunk(
    u: Tensor,
    beta: Tensor | None,
    static: dict[str, Tensor],
    proj: MemoryState,
    readout: dict[str, Tensor],
    bias: dict[str, Tensor],
    *,
    plan: _Plan,
    op: MemoryOp,
) -> tuple[dict[str, Tensor], MemoryState]:
    """One `C_proj` chunk (Eqs. 83-88, 90): every projection from the chunk-start weights, then the adaptive
    memories' update over the chunk. u `[B, H, n, d]`, beta `[B, n, H]`, static `[B, H, n, d]` each; readout
    `[H, d]`, bias `[H]` per name. -> the chunk's projections (`_generate`) and the state after it."""
    gen = _generate(u, proj.frozen(), static, readout, bias, plan)
    return gen, _update(gen, beta, proj, op, plan)


def _generate(
    u: Tensor,
    frozen: tuple[Tensor, ...],
    static: dict[str, Tensor],
    readout: dict[str, Tensor],
    bias: dict[str, Tensor],
    plan: _Plan,
) -> dict[str, Tensor]:
    """Eq. 83 / 90: every projection of the chunk from the chunk-start weights. u `[B, H, n, d]`."""
    B, H, n, d = u.shape
    P = len(plan.adaptive)
    out = memory_apply(frozen, u.repeat(1, P, 1, 1), plan.spec).view(B, P, H, n, d)
    gen = {name: out[:, i] for i, name in enumerate(plan.adaptive)} | static
    gen["k"] = l2norm(gen["k"])
    if plan.normalize_v:
        gen["v"] = l2norm(gen["v"])
    for name in plan.readouts:  # per-head scalars squashed into [0, 1] (D6)
        z = (gen[name] * readout[name].to(u.dtype)[None, :, None]).sum(-1)
        gen[name] = torch.sigmoid(z + bias[name].to(u.dtype)[None, :, None]).transpose(1, 2)
    gen["eta"] = plan.eta_scale * gen["eta"]
    return gen


def _update(gen: dict[str, Tensor], beta: Tensor | None, proj: MemoryState, op: MemoryOp, plan: _Plan) -> MemoryState:
    """Eqs. 84-88 for the adaptive projection memories over one chunk, stacked as `P * H` heads."""
    P = len(plan.adaptive)
    k = gen["k"].transpose(1, 2).repeat(1, 1, P, 1)  # [B, n, P*H, d]; shared key for every memory
    v = gen["v"].transpose(1, 2).repeat(1, 1, P, 1)  # each memory makes its own target M_□(v) (Eq. 84)
    gates = [g.repeat(1, 1, P) if g is not None else None for g in (gen["eta"], gen.get("alpha"), beta)]
    _, proj = op(k, k, v, *gates, state=proj, spec=plan.spec, chunk_size=plan.chunk)
    return proj


# The compiled step's backend; the tests take "aot_eager" (the same traced graphs, without code generation).
COMPILE_BACKEND = "inductor"


@functools.cache
def _compiled_step(plan: _Plan, backend: str) -> Callable[..., tuple[dict[str, Tensor], MemoryState]]:
    """`_project_chunk` of whole chunks from a boundary under `torch.compile`, one per layer configuration (the
    weights are arguments, so every layer of a model shares it), the update on the chunk form with autocast off
    (float32 fast weights, as the GPU ops compute them; `_chunk_float`). One graph (`fullgraph`), static shapes
    until a call changes one (another batch size: then that dimension is traced dynamic, torch's default): the
    generation, gate products and the chunk's matrix steps come out as about 60 kernels forward and 90 backward
    (counted in Inductor's code on CPU, at the 20M shapes) instead of ~330 launches per chunk and layer.
    `plan.budget`: AOTAutograd's activation memory budget, set around every call (the compile happens inside the
    first) and read inside the trace, so that dynamo guards on it."""

    def traced(*args: object) -> tuple[dict[str, Tensor], MemoryState]:
        # the budget shapes the compiled code but no traced value: read here, so that dynamo guards on it and
        # another budget is another compile
        torch._check(0 < plan.budget <= 1)
        return _project_chunk(*args, plan=plan, op=_chunk_float)

    step = torch.compile(traced, backend=backend, fullgraph=True)

    def run(*args: object) -> tuple[dict[str, Tensor], MemoryState]:
        # donated buffers off: with online CMS levels the step's backward runs twice (the segment's inner gradient,
        # then the outer loss), which a backward that donated its saved buffers refuses (seen on torch 2.11)
        with torch._functorch.config.patch(activation_memory_budget=plan.budget, donated_buffer=False):
            return step(*args)

    return run


_EAGER_PLANS: set[_Plan] = set()  # configurations whose compiles hit torch's recompile limit: eager from then on


def _run_compiled(plan: _Plan, args: tuple, eager: Callable[..., tuple[dict[str, Tensor], MemoryState]]) -> tuple:
    """The compiled step, or, once torch refuses another compile (its per-function limit, 8 by default, shared by
    every configuration: autocast on / off, batch sizes, several models in one process), the eager step with a
    warning."""
    if plan not in _EAGER_PLANS:
        try:
            return _compiled_step(plan, COMPILE_BACKEND)(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            _EAGER_PLANS.add(plan)
            warnings.warn("compile_projection: torch.compile's recompile limit reached (torch._dynamo.config."
                          "recompile_limit); this configuration's projection step runs eagerly from now on: the same "
                          "results, slower", stacklevel=2)  # fmt: skip
    return eager(*args)


def _chunk_float(*args: Tensor | None, state: MemoryState, **kwargs: object) -> tuple[Tensor, MemoryState]:
    """`memory_chunk` with autocast off (`common.no_autocast`)."""
    with no_autocast(state.weights[0]):
        return memory_chunk(*args, state=state, **kwargs)


def _uniform(proj: MemoryState) -> MemoryState:
    """A boundary state in the one layout the compiled step is traced for, so that a layer's first chunk and
    the others share one compile: no anchor (at a boundary it is the weights), contiguous tensors (the initial
    state is its parameters expanded over the batch) and, when any of them records gradients, all of them (the
    initial momenta are constant zeros: they get an unused gradient)."""
    tensors = [t.contiguous() for ts in proj[:2] for t in ts]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        tensors = [t if t.requires_grad else t.detach().requires_grad_() for t in tensors]
    P = len(proj.weights)
    return MemoryState(tuple(tensors[:P]), tuple(tensors[P:]), (), 0)


def _chunk_ends(T: int, chunk: int, offset: int) -> list[int]:
    """Where each chunk of a call of T tokens ends, the first finishing an open chunk of which `offset` tokens
    came before: `_chunk_ends(10, 4, 1) == [3, 7, 10]`."""
    ends, t = [], 0
    while t < T:
        t = min(t + chunk - (offset if not ends else 0), T)
        ends.append(t)
    return ends


def _cat_time(pieces: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Consecutive pieces of the generated projections joined along time (vectors `[B, H, n, d]` on dim 2, gates
    `[B, n, H]` on dim 1)."""
    time_dim = {name: 2 if g.dim() == 4 else 1 for name, g in pieces[0].items()}
    return {name: torch.cat([p[name] for p in pieces], dim=dim) for name, dim in time_dim.items()}
