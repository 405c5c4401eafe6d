"""CUDA graphs of a language model's block calls for training steps (`StepGraphs`) and for decoding one token at
a time (`DecodeGraphs`, at the end of this file). Training: each call of a block in a step (its forward
and its backward) is replayed as one graph each, so a step costs a few launches per block call instead of one
per small kernel.

What this is: `StepGraphs(model)` installs itself as the model's block runner (`CausalLM.block_runner`); its
`logits(input_ids)` is `model(input_ids)[0]` for a training step, in which the k-th call of block i replays a
graph captured at that call's first occurrence (`_graphed`: the pattern of `torch.cuda.make_graphed_callables`,
with gradients handed out as copies, so that gradient accumulation over micro-batches stays right). A call's
inputs are the block's input and every tensor of its state, its outputs the block's output and every new state
tensor (tensors the block hands through unchanged stay the caller's own); the initial state of a block's first
call is built outside the graph from the parameters. The embedding, final norm, LM head, loss and optimizer run
as usual.
Why: the memory layers' chunk loops (and HOPE's projection memories, one op call per `C_proj` chunk) issue
thousands of small kernels per step, and the host, not the GPU, sets the pace (the MLP memory op on the H200:
723 ms of host time for 78 ms of GPU time per forward + backward, docs/results/memory_op.md).
Semantics are the eager model's: the same kernels run on the same values (the graphs hold the parameters' storage,
which the optimizer updates in place; the captured inputs are copied in at every replay). A graph's outputs are
its own buffers, rewritten by the next step's replay: the block states a step returns are valid until the next
step (a training step from the initial state discards them). A call whose shapes or state layout differ from the
captured one gets a graph of its own (captured on first use: a few eager passes).
Online CMS levels: the driver takes each segment's inner gradient through the captured calls and later the
outer loss's, so their backward graphs are captured with `retain_graph` (`_graphed`'s `retain`; more memory),
and each call gets a second backward graph without the parameters' gradients, which the inner gradient replays
(`CausalLM.inner_gradient`; the outer backward replays the full one).
What it is not: available on CPU, with activation checkpointing, DDP / FSDP (their hooks fire inside the blocks)
or `torch.compile`; it captures nothing outside
`logits`, nothing without gradients (evaluation, generation) and no call with full meta-gradients
(`second_order`: the graphs' backward is first-order): those run eagerly.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .block import Block, BlockState
from .lm import CausalLM


def check_graphable(model: CausalLM) -> None:
    """Refuse, with the fix, a model whose training steps cannot be captured (module docstring)."""
    if model.config.activation_checkpointing:
        raise ValueError("cuda_graphs and activation_checkpointing exclude each other: set one of them false")
    if model.device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device; the model is on {model.device.type}: set cuda_graphs=false")


class _FlatCall(nn.Module):
    """One block call as a function of its tensors only: `(x, *state tensors) -> (y, *new state tensors)`, the
    non-tensor leaves (offsets, None) fixed at capture. Records which outputs are inputs handed through."""

    def __init__(self, block: Block, leaves: list[Any], spec: Any, slots: list[int]) -> None:
        super().__init__()
        self.block, self.spec, self.slots = block, spec, slots
        self.leaves = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]  # the call's own tensors: none
        self.out_leaves: list[Any] = []
        self.out_spec: Any = None
        self.out_from: list[tuple[str, int]] = []  # per output leaf: ("graph", j), ("input", k) or ("const", 0)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        leaves = list(self.leaves)
        for j, t in zip(self.slots, tensors, strict=True):
            leaves[j] = t
        x, state = tree_unflatten(leaves, self.spec)
        out_leaves, self.out_spec = tree_flatten(self.block(x, state))
        ids = {id(t): k for k, t in enumerate(tensors)}
        outs: list[Tensor] = []
        self.out_from, self.out_leaves = [], out_leaves
        for leaf in out_leaves:
            if not isinstance(leaf, Tensor):
                self.out_from.append(("const", 0))
            elif id(leaf) in ids:
                self.out_from.append(("input", ids[id(leaf)]))
            else:
                self.out_from.append(("graph", len(outs)))
                outs.append(leaf)
        return tuple(outs)

    def rebuild(self, tensors: list[Tensor], outs: tuple[Tensor, ...]) -> tuple[Tensor, BlockState]:
        """The block's `(y, new state)` from a replay's outputs and the call's own input tensors."""
        pick = {"graph": lambda j: outs[j], "input": lambda k: tensors[k]}
        leaves = [
            leaf if kind == "const" else pick[kind](j)
            for leaf, (kind, j) in zip(self.out_leaves, self.out_from, strict=True)
        ]
        return tree_unflatten(leaves, self.out_spec)


def _flatten(x: Tensor, state: BlockState) -> tuple[list[Any], Any, list[int], list[Tensor], tuple[str, ...]]:
    """A block call's `(x, state)` as pytree leaves and spec, the tensor leaves' positions, the tensors, and the
    non-tensor leaves' reprs (part of a captured call's key)."""
    leaves, spec = tree_flatten((x, state))
    slots = [j for j, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    consts = tuple(repr(leaf) for leaf in leaves if not isinstance(leaf, Tensor))
    return leaves, spec, slots, [leaves[j] for j in slots], consts


class StepGraphs:
    """The block calls of `model`'s training steps as CUDA graphs (module docstring). `warmup`: eager forward +
    backward passes before each capture (cuBLAS and the allocator settle in them). Each capture runs under the
    caller's autocast dtype with autocast's weight cache off (capture requires it)."""

    def __init__(self, model: CausalLM, *, warmup: int = 2) -> None:
        check_graphable(model)
        self.model, self.warmup = model, warmup
        self.graphs: dict[tuple, tuple[_FlatCall, Any]] = {}
        self._calls: dict[int, int] | None = None
        model.block_runner = self._run

    def logits(self, input_ids: Tensor) -> Tensor:
        """`[B, T]` ids -> logits `[B, T, V]` of a training step with the block calls replayed (eager when
        gradients are off or the model is in eval mode)."""
        if not (torch.is_grad_enabled() and self.model.training):
            return self.model(input_ids)[0]
        self._calls = {}
        try:
            return self.model(input_ids)[0]
        finally:
            self._calls = None

    def _run(self, index: int, block: Block, x: Tensor, state: BlockState | None, second_order: bool):
        if self._calls is None or second_order or not torch.is_grad_enabled():
            return block(x, state, second_order=second_order)
        n = self._calls[index] = self._calls.get(index, -1) + 1
        if state is None:  # the initial state from the parameters, outside the graph (module docstring)
            state = block.init_state(x.shape[0])
        leaves, spec, slots, tensors, consts = _flatten(x, state)
        signature = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
        key = (index, n, repr(spec), consts, signature)
        if key not in self.graphs:
            self.graphs[key] = self._capture(block, leaves, spec, slots, tensors)
        flat, graphed = self.graphs[key]
        return flat.rebuild(tensors, graphed(*tensors))

    def _capture(
        self, block: Block, leaves: list[Any], spec: Any, slots: list[int], tensors: list[Tensor]
    ) -> tuple[_FlatCall, Any]:
        retain = self.model.online_segment is not None
        return _capture_call(block, leaves, spec, slots, tensors, self.warmup, retain=retain, params=True,
                             inputs_only=(lambda: self.model.inner_gradient) if retain else None)  # fmt: skip


def _capture_call(
    block: Block,
    leaves: list[Any],
    spec: Any,
    slots: list[int],
    tensors: list[Tensor],
    warmup: int,
    *,
    retain: bool,
    params: bool,
    inputs_only: Callable[[], bool] | None = None,
) -> tuple[_FlatCall, Any]:
    """One differentiable block call captured by `_graphed` under the caller's autocast dtype (weight cache off,
    as capture requires). -> the flattened call and its graphed function of the call's tensors."""
    flat = _FlatCall(block, leaves, spec, slots)
    samples = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    amp = torch.is_autocast_enabled("cuda")
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False):
        return flat, _graphed(flat, samples, warmup, retain=retain, params=params, inputs_only=inputs_only)


@contextlib.contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, pool: Any) -> Iterator[None]:
    """`torch.cuda.graph(graph, pool=pool)` with Python's cyclic garbage collector off: a collection inside the
    capture can free an earlier model's graphs (a model and its runner form a cycle), whose private pools are
    then returned to the driver, which invalidates the capture (seen on the H200: "operation failed due to a
    previous error during capture" in a test process that had captured other models before)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        if enabled:
            gc.enable()


def _graphed(
    fn: nn.Module,
    samples: list[Tensor],
    warmup: int,
    *,
    retain: bool = False,
    params: bool = True,
    inputs_only: Callable[[], bool] | None = None,
) -> Any:
    """`fn(*tensors) -> tuple of tensors` as an autograd function whose forward and backward each replay one CUDA
    graph (the pattern of `torch.cuda.make_graphed_callables`, in a private memory pool). Unlike that function's,
    the backward returns copies of the graph's gradient buffers: autograd may keep a returned gradient (as a
    parameter's `.grad`, or in a sum it adds to in place) past the next replay, which rewrites the buffers.
    `retain`: the backward may be replayed more than once per forward (online CMS levels: the segment's inner
    gradient, then the outer loss), so it is captured with `retain_graph`: captured without it, it frees the
    forward's saved tensors into the pool as it goes and its own later temporaries overwrite them, which a
    second replay would read. Without `retain` the pool reuses that memory (HOPE, static levels, 20M, 8 x 2,048
    on the H200: 13.0 GiB peak without, 112.4 GiB with). `params=False`: the backward gives no gradient to
    `fn`'s parameters (callers that never need them: the online CMS's learning step without an outer graph).
    `inputs_only` (with `retain` and `params`): a second backward graph is captured without the parameters'
    gradients, and replayed instead of the full one whenever `inputs_only()` is true at backward time (the online
    driver's inner gradient inside a training step, `CausalLM.inner_gradient`: that pass differentiates only
    towards the fast weights, and the outer backward that follows takes the parameters' gradients); the
    parameters then get None from that replay. `counts` (an attribute of the returned function) counts the
    backward replays of each kind."""
    weights = [p for p in fn.parameters() if p.requires_grad] if params else []
    inputs = samples + weights
    wants = [t.requires_grad for t in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            outs = [o for o in fn(*samples) if o.requires_grad]
            torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], [torch.ones_like(o) for o in outs],
                                allow_unused=True)  # fmt: skip
    torch.cuda.current_stream().wait_stream(stream)
    pool = torch.cuda.graph_pool_handle()
    fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with _capturing(fwd, pool):
        static_out = fn(*samples)
    needs = [o.requires_grad for o in static_out]
    grad_out = [torch.zeros_like(o) for o, n in zip(static_out, needs, strict=True) if n]
    with _capturing(bwd, pool):
        grads = torch.autograd.grad([o for o, n in zip(static_out, needs, strict=True) if n],
                                    [t for t in inputs if t.requires_grad], grad_out, allow_unused=True,
                                    retain_graph=retain)  # fmt: skip
    grad_in: list[Tensor | None] = []
    it = iter(grads)
    for w in wants:
        grad_in.append(next(it) if w else None)
    n_user = len(samples)
    lean: torch.cuda.CUDAGraph | None = None  # the inputs-only backward (docstring)
    if inputs_only is not None and retain and weights:
        lean = torch.cuda.CUDAGraph()
        with _capturing(lean, pool):
            lean_grads = torch.autograd.grad([o for o, n in zip(static_out, needs, strict=True) if n],
                                             [t for t in samples if t.requires_grad], grad_out, allow_unused=True,
                                             retain_graph=True)  # fmt: skip
        it = iter(lean_grads)
        grad_lean = [next(it) if t.requires_grad else None for t in samples] + [None] * len(weights)
    counts = {"backward": 0, "inputs-only backward": 0}

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *args: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
            for static, real in zip(samples, args[:n_user], strict=True):
                static.copy_(real)
            fwd.replay()
            return tuple(o.detach() for o in static_out)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, *g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
            k = 0
            for gi, n in zip(g, needs, strict=True):
                if n:
                    grad_out[k].copy_(gi)
                    k += 1
            if lean is not None and inputs_only is not None and inputs_only():
                lean.replay()
                counts["inputs-only backward"] += 1
                return tuple(None if b is None else b.clone() for b in grad_lean)
            bwd.replay()
            counts["backward"] += 1
            return tuple(None if b is None else b.clone() for b in grad_in)

    def call(*args: Tensor) -> tuple[Tensor, ...]:
        return Graphed.apply(*args, *weights)

    call.counts = counts  # type: ignore[attr-defined]
    return call


# ---------------------------------------------------------------------------------------------
# decoding: one token at a time, without gradients


class DecodeGraphs:
    """The block calls of token-by-token decoding (`model(token, state)` under `no_grad`, one token per call) replayed
    as CUDA graphs, so a decode step costs a few launches per block instead of one per small kernel. Install with
    `with DecodeGraphs(model): ...` (or `close()`), e.g. around `generate`; `nestlearn generate --cuda-graphs` does.
    A call is keyed by its block, state layout, non-tensor leaves (e.g. a memory's offset in its current chunk) and
    tensor shapes; its graph is captured the second time the key is seen (one eager warm-up pass, then the capture),
    so a block whose state changes form at every token never gets one and runs eagerly (an attention cache grows,
    and every attention state, MAG / MAL's windows and MAC's segments included, carries the absolute position as an
    int), while a recurrent block's calls (Titans LMM, HOPE) repeat with the chunk offsets' period and are all
    captured after one period (HOPE at 20M: 64 offsets x 10 blocks = 640 graphs). Every graph shares one memory
    pool: the replay's outputs are copied out at once (the caller owns the state it gets), so a graph's buffers hold
    nothing live between replays and the graphs may reuse each other's memory in any order. Semantics are the eager
    calls': the same kernels on the same values (the graphs read the parameters' storage, so in-place weight updates
    are seen). The online CMS's learning step (every S tokens: the segment's forward and the inner gradient
    through it, `CausalLM.inner_only`) is captured too, each block call's forward and backward as one graph each
    (`_graphed`, without the parameters' gradients, which that step never takes), keyed as above and captured at
    the key's second sighting; its outputs are copied out as well. At 32K tokens of context on the H200 the
    eager learning step of HOPE 20M took 1.75 s, 3.4 ms of the 12.7 ms amortised per decoded token
    (docs/results/speed.md). What is not captured (runs as before): other calls with gradients (training, an
    outer graph), in training mode, prompts outside a learning step, a block's first call (no state yet).
    What it is not: available on CPU."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.pool = self._new_pool()
        self.graphs: dict[tuple, tuple[_FlatCall, Any, list[Tensor], tuple[Tensor, ...]]] = {}
        self.learning: dict[tuple, tuple[_FlatCall, Any]] = {}  # the learning step's block calls
        self.seen: set[int] = set()
        # block calls since install: one-token calls without gradients; the learning step's calls
        self.counts = {"eager": 0, "replayed": 0, "learning eager": 0, "learning replayed": 0}
        self._inner = model.block_runner
        model.block_runner = self._run

    def _new_pool(self) -> Any:
        if self.model.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need a CUDA device; the model is on {self.model.device.type}: decode without them "
                "(no DecodeGraphs, no --cuda-graphs) or move the model to a GPU"
            )
        return torch.cuda.graph_pool_handle()

    def close(self) -> None:
        """Give the model its previous block runner back and free the graphs."""
        if self.model.block_runner == self._run:
            self.model.block_runner = self._inner
        self.graphs.clear()
        self.learning.clear()

    def __enter__(self) -> DecodeGraphs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _eager(self, index: int, block: Block, x: Tensor, state: BlockState | None, second_order: bool):
        if self._inner is not None:
            return self._inner(index, block, x, state, second_order)
        return block(x, state, second_order=second_order)

    def _run(self, index: int, block: Block, x: Tensor, state: BlockState | None, second_order: bool):
        if self.model.training or state is None:
            return self._eager(index, block, x, state, second_order)
        if torch.is_grad_enabled():
            return self._learn(index, block, x, state, second_order)
        if x.shape[1] != 1:
            return self._eager(index, block, x, state, second_order)
        leaves, spec, slots, tensors, consts = _flatten(x, state)
        signature = tuple((tuple(t.shape), t.dtype) for t in tensors)
        key = (index, repr(spec), consts, signature, torch.is_autocast_enabled("cuda"))
        if key not in self.graphs:
            if self._first_sighting(key, "eager"):
                return self._eager(index, block, x, state, second_order)
            self.graphs[key] = self._capture(block, leaves, spec, slots, tensors)
        self.counts["replayed"] += 1
        flat, graph, static_in, static_out = self.graphs[key]
        for static, real in zip(static_in, tensors, strict=True):
            static.copy_(real)
        graph.replay()
        return flat.rebuild(tensors, tuple(o.clone() for o in static_out))

    def _first_sighting(self, key: tuple, count: str) -> bool:
        """Whether `key` is seen for the first time (the call then runs eagerly, counted under `count`)."""
        if hash(key) in self.seen:  # hashes only: an attention block adds one key per token
            return False
        self.seen.add(hash(key))
        self.counts[count] += 1
        return True

    def _learn(self, index: int, block: Block, x: Tensor, state: BlockState, second_order: bool):
        """A block call with gradients: replayed when it belongs to the learning step (`CausalLM.inner_only`)
        and something in it is differentiated, else eager. The outputs are copies (the caller owns them)."""
        leaves, spec, slots, tensors, consts = _flatten(x, state)
        if not self.model.inner_only or second_order or not any(t.requires_grad for t in tensors):
            return self._eager(index, block, x, state, second_order)
        signature = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
        key = ("learning", index, repr(spec), consts, signature, torch.is_autocast_enabled("cuda"))
        if key not in self.learning:
            if self._first_sighting(key, "learning eager"):
                return self._eager(index, block, x, state, second_order)
            self.learning[key] = _capture_call(block, leaves, spec, slots, tensors, 1, retain=False, params=False)
        self.counts["learning replayed"] += 1
        flat, graphed = self.learning[key]
        return flat.rebuild(tensors, tuple(o.clone() for o in graphed(*tensors)))

    def _capture(self, block: Block, leaves: list[Any], spec: Any, slots: list[int], tensors: list[Tensor]):
        flat = _FlatCall(block, leaves, spec, slots)
        static_in = [t.detach().clone() for t in tensors]
        amp = torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                flat(*static_in)  # warm-up on a side stream, as capture requires
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with _capturing(graph, self.pool):
                static_out = flat(*static_in)
        return flat, graph, static_in, static_out
