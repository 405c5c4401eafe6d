"""The causal language model of every variant, with its learning state as an explicit object (D11, D12).

What this is: `CausalLM(config)`: token embedding, `n_layers` pre-norm residual blocks, final RMSNorm, tied LM
head. `forward(input_ids, state=None) -> (logits, state)`; `generate` feeds the prompt in one pass and then
samples token by token (up to a stop token), the memories still learning from every token they read. Blocks
per variant:

    transformer       x + Attn(norm x);            x + SwiGLU(norm x)     Llama-style Transformer++
    hope_attention    x + Attn(norm x);            x + CMS(norm x)        Transformer with the CMS (§8.3)
    hope              x + SelfModTitans(norm x);   x + CMS(norm x)        Eqs. 94-97
    titans_lmm        x + TitansMemory(norm x);    x + SwiGLU(norm x)
    titans_mac        x + MAC(norm x);             x + SwiGLU(norm x)     Titans Eqs. 21-25
    titans_mag        x + MAG(norm x);             x + SwiGLU(norm x)     Titans Eqs. 26-28
    titans_mal        x + TitansMemory(norm x);    x + SWA(norm x);  x + SwiGLU(norm x)   Titans Eqs. 29-31

When a CMS has online levels the forward pass runs segment by segment and the levels learn from the next-token
loss of what the model reads (D10, `online.py`); `learn` reads a document without generating, and
`forget_context` drops what the sequence mixers hold while keeping what the CMS learned.
What it is not: a trainer, a tokenizer, or the Hugging Face wrapper (`hf.py`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers.attention import Attention
from ..layers.basic import RMSNorm, SwiGLU
from ..layers.cms import CMS
from ..layers.hybrid import MemoryAsContext, MemoryAsGate
from ..layers.self_modifying import SelfModifyingTitans
from ..layers.titans import TitansMemory
from ..ops.memory import MemorySpec
from .config import ModelConfig
from .online import OnlineCMS, Pending, run_online


class ModelState(NamedTuple):
    """The model's whole learning state (D12): one entry per block (its mixers' states, then its CMS fast weights
    when it has a CMS), tokens seen, the config it belongs to, and the segment an online CMS has not yet learned
    from (`online.Pending`; None when there is none)."""

    layers: tuple[Any, ...]
    position: int
    fingerprint: str
    pending: Pending | None = None

    @property
    def batch_size(self) -> int:
        first = _first_tensor(self.layers)
        assert first is not None, "a model state always holds tensors"
        return first.shape[0]


class Block(nn.Module):
    """Pre-norm residual block: one or two sequence mixers, then the MLP (a SwiGLU, or the CMS)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.mixers = nn.ModuleList(_mixers(cfg))
        self.norms = nn.ModuleList(RMSNorm(cfg.d_model, cfg.norm_eps) for _ in self.mixers)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module
        if cfg.uses_cms:
            self.mlp = CMS(
                cfg.d_model, cfg.mlp_hidden, cfg.cms_levels, variant=cfg.cms_variant, lr=cfg.level_lrs,
                learn_lr=cfg.cms_learn_lr, online=cfg.online_block(index), level_norm=cfg.cms_level_norm,
            )  # fmt: skip
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
        mixers = tuple(_init_mixer(m, batch, device, dtype) for m in self.mixers)
        return (*mixers, self.mlp.init_state(batch)) if isinstance(self.mlp, CMS) else mixers

    def forward(self, x: Tensor, state: tuple[Any, ...] | None) -> tuple[Tensor, tuple[Any, ...]]:
        """`state=None` starts from the initial state, built here (inside the block's own forward, so that a
        parameter-sharding wrapper such as FSDP2 has gathered the block's weights first)."""
        if state is None:
            state = self.init_state(x.shape[0], x.device, self.mlp_norm.weight.dtype)
        new = []
        for norm, mixer, st in zip(self.norms, self.mixers, state, strict=False):
            y, st = mixer(norm(x), st)
            x = x + y
            new.append(st)
        if isinstance(self.mlp, CMS):
            cms = state[-1]
            return x + self.mlp(self.mlp_norm(x), cms), (*new, cms)
        return x + self.mlp(self.mlp_norm(x)), tuple(new)


class CausalLM(nn.Module):
    """A language model of any variant (`ModelConfig.variant`) with explicit learning state."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, init_std) for the embedding and every linear weight; biases (gate offsets) keep their values."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=self.config.init_std)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch_size: int) -> ModelState:
        """The meta-learned initial state for `batch_size` sequences (what `reset` returns to)."""
        dtype = self.embed.weight.dtype
        layers = tuple(b.init_state(batch_size, self.device, dtype) for b in self.blocks)
        return ModelState(layers, 0, self.config.fingerprint())

    @property
    def online(self) -> OnlineCMS | None:
        """The blocks whose CMS learns online, with the segment length and meta-gradient mode (None if none)."""
        blocks = [(i, b.mlp) for i, b in enumerate(self.blocks) if isinstance(b.mlp, CMS) and b.mlp.online_levels]
        if not blocks:
            return None
        segment = math.gcd(*(c for _, cms in blocks for c in cms.chunks if c is not None))
        return OnlineCMS(blocks, segment, self.config.cms_meta_grad == "full")

    def forward(
        self, input_ids: Tensor, state: ModelState | None = None, *, learn: bool = True
    ) -> tuple[Tensor, ModelState]:
        """input_ids `[B, T]` (int) -> logits `[B, T, vocab]` and the state after the last token.

        `learn=False` reads without online CMS updates (the sequence mixers' memories still read every token);
        the segment it touches is then not learned from.
        """
        self._check(input_ids, state)
        if state is None:  # every block builds its own initial state (see Block.forward)
            state = ModelState((None,) * len(self.blocks), 0, self.config.fingerprint())
        end = state.position + input_ids.shape[1]
        online = self.online
        if online is None:
            logits, layers = self._forward_layers(input_ids, state.layers)
            return logits, ModelState(layers, end, state.fingerprint)
        logits, layers, pending = run_online(
            self._forward_layers, online, input_ids, state.layers, state.position, state.pending, learn
        )
        return logits, ModelState(layers, end, state.fingerprint, pending)

    def _forward_layers(self, input_ids: Tensor, layers: tuple[Any, ...]) -> tuple[Tensor, tuple[Any, ...]]:
        """Every block from the given states with the CMS weights in force. -> logits `[B, T, V]`, new states."""
        x = self.embed(input_ids)
        new = []
        for block, st in zip(self.blocks, layers, strict=True):
            if self.config.checkpoint and torch.is_grad_enabled():
                x, st = checkpoint(block, x, st, use_reentrant=False)
            else:
                x, st = block(x, st)
            new.append(st)
        return self.lm_head(self.norm(x)), tuple(new)

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
        weights and their accumulated gradients are kept."""
        self._check_state(state)
        fresh = self.init_state(state.batch_size)
        layers = tuple(
            (*new[:-1], old[-1]) if isinstance(b.mlp, CMS) else new
            for b, new, old in zip(self.blocks, fresh.layers, state.layers, strict=True)
        )
        return ModelState(layers, 0, state.fingerprint)

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
        CMS levels from learning on sampled tokens (the sequence mixers still read them).
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        self._check_stop_token(stop_token)
        self._check(input_ids, state)
        self.check_vocabulary(input_ids)
        logits, state = self(input_ids, state)
        out: list[Tensor] = []
        done = None if stop_token is None else torch.zeros(input_ids.shape[0], dtype=torch.bool, device=logits.device)
        for _ in range(max_new_tokens):
            nxt = _sample(logits[:, -1].float(), temperature, top_k, top_p, generator)
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
        if stop_token is not None and (not _is_int(stop_token) or not 0 <= stop_token < V):
            raise ValueError(
                f"stop_token must be None (never stop) or a token id in 0 .. {V - 1} (vocab_size = {V}), got "
                f"{stop_token!r}; pass the end-of-text id of the tokenizer the model was trained with"
            )

    def _check_state(self, state: ModelState) -> None:
        if not isinstance(state, ModelState):
            raise ValueError(f"state must be a ModelState from model.init_state or forward, got {type(state).__name__}")
        if state.fingerprint != self.config.fingerprint():
            raise ValueError(
                "state comes from a model with another configuration; use model.init_state(batch_size) or a state "
                "this model produced or saved"
            )


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits `[B, T, V]` against target ids `[B, T]`, computed in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model a config builds (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# construction helpers


def memory_spec(cfg: ModelConfig, *, titans: bool) -> MemorySpec:
    """The memories' spec from the config (Titans variants: plain GD, Titans Eqs. 13-14, with the inner clip)."""
    return MemorySpec(
        kind=cfg.memory_kind,
        activation=cfg.memory_activation,
        expansion=cfg.memory_expansion,
        dgd=cfg.dgd and not titans,
        momentum=cfg.momentum,
        decay=cfg.weight_decay,
        max_grad_norm=cfg.inner_grad_clip if titans else None,
    )


def _mixers(cfg: ModelConfig) -> list[nn.Module]:
    D, H, v = cfg.d_model, cfg.n_heads, cfg.variant
    titans = memory_spec(cfg, titans=True)
    if v in ("transformer", "hope_attention"):
        return [
            Attention(
                D, H, max_len=cfg.max_seq_len, rope_base=cfg.rope_base, kv_heads=cfg.n_kv_heads,
                qkv_bias=cfg.qkv_bias, window=cfg.attn_window, rope_scaling=_rope_scaling(cfg),
            )
        ]  # fmt: skip
    if v == "hope":
        return [
            SelfModifyingTitans(
                D, H, spec=memory_spec(cfg, titans=False), mem_chunk=cfg.mem_chunk, proj_chunk=cfg.proj_chunk,
                adaptive_k=cfg.adaptive_k, adaptive_v=cfg.adaptive_v, adaptive_q=cfg.adaptive_q,
                normalize_v=cfg.normalize_v, impl=cfg.impl,
            )
        ]  # fmt: skip
    memory = dict(spec=titans, chunk_size=cfg.mem_chunk, impl=cfg.impl)
    if v == "titans_lmm":
        return [TitansMemory(D, H, **memory)]
    if v == "titans_mag":
        return [MemoryAsGate(D, H, window=cfg.window, n_persistent=cfg.n_persistent, **memory)]
    if v == "titans_mac":
        return [MemoryAsContext(D, H, segment=cfg.segment, n_persistent=cfg.n_persistent, **memory)]
    swa = Attention(
        D, H, window=cfg.window, n_persistent=cfg.n_persistent, rope_base=cfg.rope_base,
        rope_scaling=_rope_scaling(cfg),
    )  # fmt: skip
    return [TitansMemory(D, H, **memory), swa]  # titans_mal


def _rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    return dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None


def _init_mixer(mixer: nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(mixer, Attention):
        return mixer.init_state(batch, device, dtype)
    return mixer.init_state(batch)


# ---------------------------------------------------------------------------------------------
# sampling


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an int >= 1, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None (off) or a number in (0, 1], got {top_p!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """logits `[B, V]` -> token ids `[B]`: the argmax at temperature 0, else a draw from the softmax of
    logits / temperature restricted to the top_k most likely tokens, then to the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """`[B, V]`: -inf outside the fewest most likely tokens whose probabilities sum to at least top_p (the most
    likely token always stays)."""
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    reached = probs.cumsum(-1) - probs >= top_p  # the more likely tokens already sum to top_p
    return logits.masked_fill(torch.zeros_like(reached).scatter(-1, order, reached), float("-inf"))


def _first_tensor(tree: Any) -> Tensor | None:
    if isinstance(tree, Tensor):
        return tree
    if isinstance(tree, (tuple, list)):
        for item in tree:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None
