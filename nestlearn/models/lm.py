"""The causal language model of every variant, with its learning state as an explicit object (D11, D12), and
the online CMS driver (D10, Eq. 71).

What this is: `CausalLM(config)`: token embedding, `n_layers` pre-norm residual blocks (`block.py`), final
RMSNorm, tied LM head. `forward(input_ids, state=None) -> (logits, state)`; `generate` feeds the prompt in one
pass and then samples token by token (up to a stop token), the memories still learning from every token they
read; `learn` reads a document without generating; `forget_context` drops what the sequence mixers hold while
keeping what the CMS learned. `ModelState` holds one `BlockState` per block; `next_token_loss` is the one
next-token cross-entropy of the package.

The online CMS (blocks whose CMS has online levels) is driven inside `forward`: the model runs segment by
segment. Segments are aligned to absolute positions and `S` tokens long (`S` = the gcd of the online chunk
sizes, so every level boundary is a segment end). For each segment: forward every block from the carried state
with the CMS weights in force; take the segment's next-token loss summed over its `S` predictions, the last of
them the prediction of the next segment's first token (the pair that crosses the boundary); take its gradient
with respect to every online level's fast weights (per sequence: each sequence's loss depends only on its own
weights); hand it to each CMS (`CMS.step`), which adds it to its accumulators and applies the updates due at
the segment end. The logits a caller gets are those of that forward, so an outer loss over them sees every
segment with the weights that were in force for it. The update made at a segment end therefore waits for the
token after it; it is still causal, since the new weights act from that token on.
A call may end inside a segment, or at its end before the next token. Its tokens are read at once (their
logits need no gradient), and the state keeps the segment's tokens with the block states at its start
(`Pending`); the call that completes the segment and reads the next token runs the whole segment again from
there to take its gradient. So one pass == pieces == token by token, and a decoded token costs one step plus,
every `S` tokens, one segment's forward and backward. A completed segment that learns without its next token
(a call with `learn=False` reads that token, or `forget_context` ends the context) learns from its `S - 1`
pairs inside it.
Meta-gradients (`cms_meta_grad`): "first_order" takes the inner gradient without a graph (the outer gradient
reaches the initial weights through the update's identity path, and the learning rates through `-lr * g`);
"full" keeps its graph (exact second order; the blocks are then told `second_order=True`, and attention runs
SDPA's math kernel, the only one with a double backward). Inner gradients need autograd, so learning is
unavailable under `torch.inference_mode` (`torch.no_grad` is fine: the segment is differentiated locally and the
results detached).
What it is not: a trainer, a tokenizer, or the Hugging Face wrapper (`hf.py`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers.basic import RMSNorm
from .block import Block, BlockState
from .config import ModelConfig
from .sampling import check_sampling, is_int, sample


class Pending(NamedTuple):
    """The current online segment's tokens read so far `[B, n]` and every block's state at the segment start
    (None for a block that has not run yet). `n = S` (at a segment end) means the segment is complete and waits
    for the next token, the target of its last prediction, to learn."""

    tokens: Tensor
    blocks: tuple[BlockState | None, ...]


class ModelState(NamedTuple):
    """The model's whole learning state (D12): one `BlockState` per block (None before the block's first call),
    tokens seen, the config it belongs to, and the segment an online CMS has not yet learned from (None when
    there is none)."""

    blocks: tuple[BlockState | None, ...]
    position: int
    fingerprint: str
    pending: Pending | None = None

    @property
    def batch_size(self) -> int:
        first = _first_tensor(self.blocks)
        assert first is not None, "a model state always holds tensors"
        return first.shape[0]


class CausalLM(nn.Module):
    """A language model of any variant (`ModelConfig.variant`) with explicit learning state."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # the config's fingerprint, computed once: hashing the config (json + sha256) inside `forward` broke an
        # outer torch.compile's graph at every call (`tests/train/test_compile.py`)
        self.fingerprint = config.fingerprint()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights()
        # the blocks whose CMS learns online, and the segment length of the online driver
        self.online_blocks = tuple(i for i, b in enumerate(self.blocks) if b.cms is not None and b.cms.online_levels)
        chunks = [c for i in self.online_blocks for c in self.blocks[i].cms.chunks if c is not None]
        self.online_segment: int | None = math.gcd(*chunks) if chunks else None
        # what runs a block call `(index, block, x, state, second_order) -> (x, state)` where it is not the
        # block itself: `graphs.StepGraphs` replays captured calls through it
        self.block_runner: Callable[..., tuple[Tensor, BlockState]] | None = None
        # True while the online driver forwards a segment whose only gradient is its inner one (no outer graph:
        # generation, prefill, `learn` under no_grad): each block call of it is then differentiated once, with
        # respect to its inputs and fast weights, never its parameters (`graphs.DecodeGraphs` captures such calls)
        self.inner_only = False
        # True while the online driver takes a segment's inner gradient inside an outer graph (training): that
        # backward needs no parameter's gradient, only the fast weights' (`graphs.StepGraphs` replays a captured
        # backward without the parameters' gradients then); the outer backward comes later
        self.inner_gradient = False

    def _init_weights(self) -> None:
        """N(0, init_std) for the embedding and every linear weight; biases (gate offsets) keep their values."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=self.config.init_std)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch_size: int) -> ModelState:
        """The meta-learned initial state for `batch_size` sequences (where every new sequence starts)."""
        return ModelState(tuple(b.init_state(batch_size) for b in self.blocks), 0, self.fingerprint)

    def forward(
        self, input_ids: Tensor, state: ModelState | None = None, *, learn: bool = True
    ) -> tuple[Tensor, ModelState]:
        """input_ids `[B, T]` (int) -> logits `[B, T, vocab]` and the state after the last token.

        `learn=False` reads without online CMS updates (the sequence mixers' memories still read every token);
        the segment it touches is then not learned from. A segment that an earlier call completed is learned
        from first, without the pair whose target this call reads.
        """
        self._check(input_ids, state)
        if state is None:  # every block builds its own initial state (see Block.forward)
            state = ModelState((None,) * len(self.blocks), 0, self.fingerprint)
        end = state.position + input_ids.shape[1]
        if self.online_segment is None:
            logits, blocks = self._forward_blocks(input_ids, state.blocks)
            return logits, ModelState(blocks, end, state.fingerprint)
        logits, blocks, pending = self._forward_online(input_ids, state, learn)
        return logits, ModelState(blocks, end, state.fingerprint, pending)

    def _forward_blocks(
        self, input_ids: Tensor, states: tuple[BlockState | None, ...], second_order: bool = False
    ) -> tuple[Tensor, tuple[BlockState, ...]]:
        """Every block from the given states with the CMS weights in force. -> logits `[B, T, V]`, new states."""
        x = self.embed(input_ids)
        new = []
        for i, (block, st) in enumerate(zip(self.blocks, states, strict=True)):
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                x, st = checkpoint(block, x, st, second_order=second_order, use_reentrant=False)
            elif self.block_runner is not None:
                x, st = self.block_runner(i, block, x, st, second_order)
            else:
                x, st = block(x, st, second_order=second_order)
            new.append(st)
        return self.lm_head(self.norm(x)), tuple(new)

    # -----------------------------------------------------------------------------------------
    # the online CMS driver (D10, Eq. 71; the module docstring describes it)

    def _forward_online(
        self, ids: Tensor, state: ModelState, learn: bool
    ) -> tuple[Tensor, tuple[BlockState, ...], Pending | None]:
        """ids `[B, T]` from `state.position` -> logits `[B, T, V]`, the block states, the pending segment.

        A pending None inside a segment means that segment is not learned from (a call with `learn=False` read
        part of it); learning resumes at the next segment start.
        """
        S, position, blocks, pending = self.online_segment, state.position, state.blocks, state.pending
        assert S is not None
        blocks, pending = self._learn_completed(blocks, pending, position, ids[:, :1] if learn else None)
        outs, t, T = [], 0, ids.shape[1]
        while t < T:
            n = min(S - position % S, T - t)
            piece = ids[:, t : t + n]
            if position % S == 0:
                pending = Pending(piece[:, :0], blocks)
            if not learn or pending is None:
                logits, blocks = self._forward_blocks(piece, blocks)
                pending = None
            elif (position + n) % S == 0 and t + n < T:  # the segment ends here and its next token is known
                k = pending.tokens.shape[1]
                tokens = torch.cat([pending.tokens, piece], dim=1)
                logits, blocks = self._learn_segment(pending.blocks, tokens, position + n, ids[:, t + n : t + n + 1])
                logits, pending = logits[:, k:], None
            else:  # inside the segment, or at its end without the next token: learn later
                logits, blocks = self._forward_blocks(piece, blocks)
                pending = Pending(torch.cat([pending.tokens, piece], dim=1), pending.blocks)
            outs.append(logits)
            position, t = position + n, t + n
        return torch.cat(outs, dim=1), blocks, pending

    def _learn_completed(
        self, blocks: tuple[BlockState | None, ...], pending: Pending | None, position: int, after: Tensor | None
    ) -> tuple[tuple[BlockState | None, ...], Pending | None]:
        """A completed segment still waiting for its next token (`after` `[B, 1]`, or None: learn from its inner
        pairs only) learns now. -> the block states after it and the pending segment left (None if it learned)."""
        S = self.online_segment
        if pending is None or S is None or position % S != 0:
            return blocks, pending
        _, new = self._learn_segment(pending.blocks, pending.tokens, position, after)
        return new, None

    def _learn_segment(
        self, start: tuple[BlockState | None, ...], tokens: Tensor, end: int, after: Tensor | None
    ) -> tuple[Tensor, tuple[BlockState, ...]]:
        """Forward the whole segment `tokens` `[B, S]` from the block states at its start, differentiate its loss,
        update the levels at absolute position `end`. `after` `[B, 1]`: the token after the segment, the target of
        its last prediction (None: that pair is left out). -> the segment's logits and the states after it."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "online CMS learning needs autograd, which torch.inference_mode disables; use torch.no_grad() "
                "instead, or pass learn=False to read without learning (a segment that the previous call completed "
                "still learns when the next call or forget_context reads its state)"
            )
        outer = torch.is_grad_enabled()
        full = self.config.cms_meta_grad == "full" and outer
        targets = tokens[:, 1:] if after is None else torch.cat([tokens[:, 1:], after], dim=1)
        with torch.enable_grad():
            start = self._differentiable(start, tokens.shape[0], fresh=not outer)
            if torch.compiler.is_compiling():  # the inner gradient needs the fast weights as inputs of the graph
                torch._dynamo.graph_break()  # that makes the loss, not as its own intermediates (made above)
            with contextlib.nullcontext() if outer else self._flagged("inner_only"):
                logits, blocks = self._forward_blocks(tokens, start, full)
            cms_states = {i: blocks[i].cms for i in self.online_blocks}
            fast = {i: self.blocks[i].cms.fast_weights(st) for i, st in cms_states.items()}
            with self._flagged("inner_gradient") if outer else contextlib.nullcontext():
                grads = _inner_grads(logits, targets, [w for ws in fast.values() for w in ws], full, outer)
            new, k = list(blocks), 0
            for i, st in cms_states.items():
                n = len(fast[i])
                new[i] = BlockState(blocks[i].mixers, self.blocks[i].cms.step(st, grads[k : k + n], end))
                k += n
        out: tuple[BlockState, ...] = tuple(new)
        if not outer:
            logits, out = logits.detach(), _detach(out)
        return logits, out

    @contextlib.contextmanager
    def _flagged(self, flag: str) -> Iterator[None]:
        """`self.<flag>` True inside (`inner_only`, `inner_gradient`), False again after, whatever happens."""
        setattr(self, flag, True)
        try:
            yield
        finally:
            setattr(self, flag, False)

    def _differentiable(
        self, states: tuple[BlockState | None, ...], batch: int, fresh: bool
    ) -> tuple[BlockState | None, ...]:
        """The block states with every online fast weight differentiable: a new detached leaf where it was not,
        or everywhere when `fresh` (no outer graph to keep). An online block not yet run (None) gets its initial
        state here, not inside its forward: the inner gradient is taken with respect to the fast weights the block
        was given, and fast weights a compiled block made inside its graph come out as new tensors that the loss
        does not depend on (zero inner gradients in the first segment; `tests/train/test_compile.py`). Its
        parameters are gathered here too: with online levels a sharded model is one FSDP unit (`train/loop.py`)."""
        new = list(states)
        for i in self.online_blocks:
            st = states[i] if states[i] is not None else self.blocks[i].init_state(batch)
            # the constructor, not `_replace`: torch 2.11's dynamo cannot rebuild a NamedTuple that `_replace` made
            # inside a compiled region at the graph break below (AssertionError in side_effects.py)
            new[i] = BlockState(st.mixers, self.blocks[i].cms.map_fast_weights(st.cms, lambda w: _leaf(w, fresh)))
        return tuple(new)

    # -----------------------------------------------------------------------------------------
    # reading, forgetting, loss, generation

    @torch.no_grad()
    def learn(
        self, document: Tensor | list[int] | str, state: ModelState | None = None, *, tokenizer: Any = None
    ) -> ModelState:
        """Read a document without generating: every memory reads it and the online CMS levels learn from its
        next-token loss. `document`: token ids `[B, T]` or `[T]`, a list of ids, or text with `tokenizer`
        (anything with `encode(text) -> list[int]`). Returns the state after the last token. Ids outside the
        vocabulary are refused (one host sync)."""
        if isinstance(document, str):
            if tokenizer is None:
                raise ValueError("learn() got text but no tokenizer; pass tokenizer=... or token ids")
            document = tokenizer.encode(document)
        ids = torch.as_tensor(document, device=self.device)
        ids = ids[None] if ids.dim() == 1 else ids
        self._check(ids, state)
        self.check_vocabulary(ids)
        _, state = self(ids, state)
        return state

    def forget_context(self, state: ModelState) -> ModelState:
        """A fresh start for a new context that keeps what the CMS learned: every sequence mixer (memories,
        attention caches) returns to its meta-learned initial state and the position to 0, while the CMS fast
        weights and their accumulated gradients are kept. A completed segment still waiting for its next token
        learns first, from the pairs inside it (one segment's forward and backward); a segment read only in
        part is dropped."""
        self._check_state(state)
        learned, _ = self._learn_completed(state.blocks, state.pending, state.position, None)
        fresh = self.init_state(state.batch_size)
        blocks = tuple(
            new if old is None else new._replace(cms=old.cms) for new, old in zip(fresh.blocks, learned, strict=True)
        )
        return ModelState(blocks, 0, state.fingerprint)

    def loss(self, input_ids: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """Mean next-token cross-entropy over `input_ids[:, 1:]`."""
        logits, state = self(input_ids, state)
        return next_token_loss(logits[:, :-1], input_ids[:, 1:]), state

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        state: ModelState | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        generator: torch.Generator | None = None,
        learn_generated: bool = True,
    ) -> tuple[Tensor, ModelState]:
        """Feed the prompt `[B, T]`, then sample up to `max_new_tokens`; every token (prompt and sampled) updates
        the state, so the memories keep learning. Returns the new tokens `[B, N]` and the state after the last
        of them was read; N = max_new_tokens unless a stop token ends generation earlier.

        Sampling: `temperature` (0 = greedy, which ignores top_k and top_p), then `top_k` (keep the k most likely
        tokens; None = all), then `top_p` (nucleus: keep the fewest most likely tokens whose probabilities sum to
        at least top_p, in (0, 1]; None = off). `stop_token` (e.g. the tokenizer's end-of-text id; None = never
        stop): a sequence that has produced it is finished and padded with it from then on; generation ends when
        every sequence of the batch has finished, so N may be smaller than max_new_tokens. The padding is read
        like any token (the batch shares one state), so generate one sequence at a time when a state must end
        exactly at its stop token; each step then costs one host sync (to see whether the batch has finished).
        Prompt ids outside the vocabulary are refused (one host sync). `learn_generated=False` keeps the online
        CMS levels from learning on sampled tokens (the sequence mixers still read them). On CUDA, `with
        graphs.DecodeGraphs(model): model.generate(...)` replays the recurrent blocks' one-token calls as CUDA
        graphs: the same tokens, fewer launches.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        self._check_stop_token(stop_token)
        self._check(input_ids, state)
        self.check_vocabulary(input_ids)
        logits, state = self(input_ids, state)
        out: list[Tensor] = []
        done = None if stop_token is None else torch.zeros(input_ids.shape[0], dtype=torch.bool, device=logits.device)
        for _ in range(max_new_tokens):
            nxt = sample(logits[:, -1].float(), temperature, top_k, top_p, generator)
            if done is not None:
                nxt = nxt.masked_fill(done, stop_token)
                done = done | (nxt == stop_token)
            out.append(nxt)
            logits, state = self(nxt[:, None], state, learn=learn_generated)  # the memories read every token
            if done is not None and bool(done.all()):  # the host sync, with a stop token only
                break
        return torch.stack(out, dim=1), state

    def _check(self, input_ids: Tensor, state: ModelState | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty (T = 0); pass at least one token")
        if state is None:
            return
        self._check_state(state)
        if state.batch_size != input_ids.shape[0]:
            raise ValueError(
                f"state holds {state.batch_size} sequences but input_ids has {input_ids.shape[0]}; "
                "states are per sequence (D1): pass a state of the same batch size"
            )

    def check_vocabulary(self, input_ids: Tensor) -> None:
        """Refuse ids outside `0 .. vocab_size - 1` (one host sync: for the user-facing `generate` and `learn`;
        `forward` stays free of syncs and the trainer checks its data itself)."""
        V = self.config.vocab_size
        if input_ids.numel() == 0:
            return
        low, high = torch.stack(input_ids.aminmax()).tolist()
        if low < 0 or high >= V:
            raise ValueError(
                f"token id {low if low < 0 else high} is outside this model's vocabulary (ids 0 .. {V - 1}, "
                f"vocab_size = {V}); the ids probably come from a tokenizer other than the one the model was trained "
                "with: encode with that tokenizer, or build the model with a vocab_size that covers them"
            )

    def _check_stop_token(self, stop_token: int | None) -> None:
        V = self.config.vocab_size
        if stop_token is not None and (not is_int(stop_token) or not 0 <= stop_token < V):
            raise ValueError(
                f"stop_token must be None (never stop) or a token id in 0 .. {V - 1} (vocab_size = {V}), got "
                f"{stop_token!r}; pass the end-of-text id of the tokenizer the model was trained with"
            )

    def _check_state(self, state: ModelState) -> None:
        if not isinstance(state, ModelState):
            raise ValueError(f"state must be a ModelState from model.init_state or forward, got {type(state).__name__}")
        if state.fingerprint != self.fingerprint:
            raise ValueError(
                "state comes from a model with another configuration; use model.init_state(batch_size) or a state "
                "this model produced or saved"
            )


def next_token_loss(logits: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits `[B, T, V]` against the target ids `[B, T]` (the tokens that follow; -100 is
    ignored), "mean" or "sum" over tokens; computed in float32 (float64 logits stay float64). The one next-token
    loss of the package: training, evaluation, the online CMS's inner loss and the Hugging Face adapter use it."""
    x = logits.flatten(0, 1)
    x = x if x.dtype == torch.float64 else x.float()
    return F.cross_entropy(x, targets.flatten(), reduction=reduction)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model a config builds (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


def _inner_grads(logits: Tensor, targets: Tensor, fast: list[Tensor], full: bool, outer: bool) -> list[Tensor]:
    """Gradient of the segment's next-token loss (Eq. 71), summed over the first `targets.shape[1]` positions of
    `logits`, w.r.t. each fast weight (zeros if unused); with `full` the gradient keeps its graph, with `outer`
    the forward's graph is kept for the outer loss."""
    if targets.shape[1] == 0:  # a one-token segment without the token after it has no target
        return [torch.zeros_like(w) for w in fast]
    loss = next_token_loss(logits[:, : targets.shape[1]], targets, reduction="sum")
    grads = torch.autograd.grad(loss, fast, create_graph=full, retain_graph=outer or full, allow_unused=True)
    return [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, fast, strict=True)]


def _leaf(w: Tensor, fresh: bool) -> Tensor:
    return w if w.requires_grad and not fresh else w.detach().requires_grad_()


def _detach(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, tuple):
        items = [_detach(x) for x in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return tree


def _first_tensor(tree: Any) -> Tensor | None:
    if isinstance(tree, Tensor):
        return tree
    if isinstance(tree, (tuple, list)):
        for item in tree:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None
