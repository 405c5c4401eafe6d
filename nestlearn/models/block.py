"""The residual block of every variant and its typed state.

What this is: `Block`, a pre-norm residual block `[B, T, D] -> [B, T, D]`: one or two sequence mixers, then the
MLP position (a SwiGLU, or the CMS); `BlockState`, its state with named fields; and `build_mixers`, which
turns a `ModelConfig` into the variant's mixers:

    transformer       x + Attn(norm x);            x + SwiGLU(norm x)     Llama-style Transformer++
    hope_attention    x + Attn(norm x);            x + CMS(norm x)        Transformer with the CMS (§8.3)
    hope              x + SelfModTitans(norm x);   x + CMS(norm x)        Eqs. 94-97
    titans_lmm        x + TitansMemory(norm x);    x + SwiGLU(norm x)
    titans_mac        x + MAC(norm x);             x + SwiGLU(norm x)     Titans Eqs. 21-25
    titans_mag        x + MAG(norm x);             x + SwiGLU(norm x)     Titans Eqs. 26-28
    titans_mal        x + TitansMemory(norm x);    x + SWA(norm x);  x + SwiGLU(norm x)   Titans Eqs. 29-31

The block's residual goes around the whole CMS: `x + CMS(norm x)`, whichever chain form the CMS computes
(`cms_chain`: with "paper", `CMS(h) = MLP_k(... MLP_1(h))`, Eq. 70, so the block computes
`x + MLP_k(... MLP_1(norm x))`; `layers/cms.py` says why the residual stays here).
Every mixer has the same interface (`Mixer`): `init_state(batch)` and `forward(x, state, *, second_order)`.
What it is not: the language model around the blocks or the online CMS driver (`lm.py`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from torch import Tensor, nn

from ..layers.attention import Attention
from ..layers.basic import RMSNorm, SwiGLU
from ..layers.cms import CMS, CMSState
from ..layers.hybrid import MemoryAsContext, MemoryAsGate
from ..layers.self_modifying import SelfModifyingTitans
from ..layers.titans import TitansMemory
from ..ops.memory import MemorySpec
from .config import ModelConfig


class Mixer(Protocol):
    """A sequence mixer: `[B, T, D] -> [B, T, D]` with an explicit state (an attention cache, memories)."""

    def init_state(self, batch: int) -> Any: ...

    def __call__(self, x: Tensor, state: Any, *, second_order: bool = False) -> tuple[Tensor, Any]: ...


class BlockState(NamedTuple):
    """One block's state: each sequence mixer's state in order, and the CMS's fast state (None when the MLP
    position is a SwiGLU; a CMS without online levels has a state of all-None levels)."""

    mixers: tuple[Any, ...]
    cms: CMSState | None = None


class Block(nn.Module):
    """Pre-norm residual block: one or two sequence mixers, then the MLP (a SwiGLU, or the CMS)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.mixers = nn.ModuleList(build_mixers(cfg))
        self.norms = nn.ModuleList(RMSNorm(cfg.d_model, cfg.norm_eps) for _ in self.mixers)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module
        if cfg.uses_cms:
            self.mlp = CMS(
                cfg.d_model, cfg.mlp_hidden, cfg.cms_levels, variant=cfg.cms_variant, lr=cfg.level_lrs,
                learn_lr=cfg.cms_learn_lr, online=cfg.online_block(index), level_norm=cfg.cms_level_norm,
                chain=cfg.cms_chain,
            )  # fmt: skip
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    @property
    def cms(self) -> CMS | None:
        """The CMS in the MLP position, or None for a SwiGLU."""
        return self.mlp if isinstance(self.mlp, CMS) else None

    def init_state(self, batch: int) -> BlockState:
        """The meta-learned initial state for `batch` sequences."""
        mixers = tuple(m.init_state(batch) for m in self.mixers)
        return BlockState(mixers, self.cms.init_state(batch) if self.cms is not None else None)

    def forward(self, x: Tensor, state: BlockState | None, *, second_order: bool = False) -> tuple[Tensor, BlockState]:
        """x `[B, T, D]` -> `[B, T, D]` and the new state. `state=None` starts from the initial state, built here
        (inside the block's own forward, so that a parameter-sharding wrapper such as FSDP2 has gathered the
        block's weights first). `second_order`: the output will be differentiated twice (`Mixer`). The CMS
        state does not change here: the online driver updates it (`CausalLM`)."""
        if state is None:
            state = self.init_state(x.shape[0])
        new = []
        for norm, mixer, st in zip(self.norms, self.mixers, state.mixers, strict=True):
            y, st = mixer(norm(x), st, second_order=second_order)
            x = x + y
            new.append(st)
        h = self.mlp_norm(x)
        y = self.mlp(h, state.cms) if self.cms is not None else self.mlp(h)
        return x + y, BlockState(tuple(new), state.cms)


# ---------------------------------------------------------------------------------------------
# construction from a config


def memory_spec(cfg: ModelConfig, *, titans: bool) -> MemorySpec:
    """The memories' spec from the config (Titans variants: plain GD, Titans Eqs. 13-14, with the inner clip; with
    `titans_paper_memory` Titans §3.3's memory `x + LN(W1 σ(W2 x))`, whose config holds no clip)."""
    return MemorySpec(
        kind=cfg.memory_kind,
        activation=cfg.memory_activation,
        expansion=cfg.memory_expansion,
        dgd=cfg.dgd and not titans,
        momentum=cfg.memory_momentum,
        decay=cfg.memory_decay,
        out_norm=titans and cfg.titans_paper_memory,
        max_grad_norm=cfg.inner_grad_clip if titans else None,
    )


def build_mixers(cfg: ModelConfig) -> list[nn.Module]:
    """The sequence mixers of one block of `cfg.variant`, in order."""
    D, H, v = cfg.d_model, cfg.n_heads, cfg.variant
    rope = dict(rope_base=cfg.rope_base, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None)
    if v in ("transformer", "hope_attention"):
        return [
            Attention(D, H, max_len=cfg.max_seq_len, kv_heads=cfg.n_kv_heads, qkv_bias=cfg.qkv_bias,
                      window=cfg.window, **rope)
        ]  # fmt: skip
    if v == "hope":
        return [
            SelfModifyingTitans(
                D, H, spec=memory_spec(cfg, titans=False), mem_chunk=cfg.mem_chunk, proj_chunk=cfg.proj_chunk,
                adaptive_k=cfg.adaptive_k, adaptive_v=cfg.adaptive_v, adaptive_q=cfg.adaptive_q,
                normalize_v=cfg.normalize_v, eta_cap=cfg.eta_cap, impl=cfg.impl, save_every=cfg.memory_save_every,
                compile_step=cfg.compile_projection, compile_budget=cfg.compile_projection_budget,
            )
        ]  # fmt: skip
    memory = dict(spec=memory_spec(cfg, titans=True), chunk_size=cfg.mem_chunk, impl=cfg.impl, eta_cap=cfg.eta_cap,
                  save_every=cfg.memory_save_every)  # fmt: skip
    assert cfg.window is not None or v not in ("titans_mag", "titans_mal")  # ModelConfig fills it
    if v == "titans_lmm":
        return [TitansMemory(D, H, **memory)]
    if v == "titans_mag":
        return [MemoryAsGate(D, H, window=cfg.window, n_persistent=cfg.n_persistent, **memory, **rope)]
    if v == "titans_mac":
        return [MemoryAsContext(D, H, segment=cfg.segment, n_persistent=cfg.n_persistent, **memory, **rope)]
    swa = Attention(D, H, window=cfg.window, n_persistent=cfg.n_persistent, **rope)
    return [TitansMemory(D, H, **memory), swa]  # titans_mal
