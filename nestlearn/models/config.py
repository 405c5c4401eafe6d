"""One typed configuration for every model of the family.

What this is: `ModelConfig` (variant, sizes, memory and chunking, Table 6 ablation switches, attention limits),
checked on construction with messages that name the fix. Every field has one meaning, and a field that does not
apply to the chosen variant is refused when it is set (`APPLIES_TO`; e.g. `mem_chunk` for a Transformer++).
Configs saved under the earlier field names (`weight_decay`, `momentum`, `checkpoint`, `attn_window`) are
read by `from_dict`. What it is not: the model (`lm.py`), the size presets (`presets.py`) or the training
configuration (`nestlearn/train/config.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from ..fields import coerce_fields
from ..layers.basic import check_rope_scaling
from ..layers.cms import check_levels
from ..layers.titans import INNER_GRAD_CLIP
from ..ops.memory.common import check_save_every

Variant = Literal["hope", "hope_attention", "titans_lmm", "titans_mac", "titans_mag", "titans_mal", "transformer"]
VARIANTS: tuple[str, ...] = Variant.__args__  # type: ignore[attr-defined]
RECURRENT: tuple[str, ...] = ("hope", "titans_lmm", "titans_mac", "titans_mag", "titans_mal")
TITANS: tuple[str, ...] = ("titans_lmm", "titans_mac", "titans_mag", "titans_mal")
CMS_VARIANTS: tuple[str, ...] = ("hope", "hope_attention")
FULL_ATTENTION: tuple[str, ...] = ("transformer", "hope_attention")
SLIDING_WINDOW: tuple[str, ...] = ("titans_mag", "titans_mal")  # their attention always has a window
SWA_WINDOW = 2048  # MAG / MAL's window when none is given
# how a model computes, not what
NO_RESULT_FIELDS = (
    "impl",
    "activation_checkpointing",
    "memory_save_every",
    "compile_projection",
    "compile_projection_budget",
)

# The variants each field applies to; fields not listed apply to every variant. The CMS fields apply only when
# `cms=True` as well.
APPLIES_TO: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("memory_kind", "memory_expansion", "memory_activation", "mem_chunk", "memory_momentum",
                     "memory_decay", "impl", "eta_cap", "memory_save_every"), RECURRENT),
    **dict.fromkeys(("proj_chunk", "dgd", "adaptive_k", "adaptive_v", "adaptive_q", "normalize_v",
                     "compile_projection", "compile_projection_budget"), ("hope",)),
    **dict.fromkeys(("inner_grad_clip", "titans_paper_memory"), TITANS),
    **dict.fromkeys(("cms", "cms_levels", "cms_variant", "cms_lr", "cms_learn_lr", "cms_meta_grad",
                     "cms_online_layers", "cms_level_norm", "cms_chain"), CMS_VARIANTS),
    **dict.fromkeys(("n_kv_heads", "qkv_bias", "max_seq_len"), FULL_ATTENTION),
    "window": FULL_ATTENTION + SLIDING_WINDOW,
    "segment": ("titans_mac",),
    "n_persistent": ("titans_mac", "titans_mag", "titans_mal"),
    **dict.fromkeys(("rope_base", "rope_scaling"), ("transformer", "hope_attention", *TITANS[1:])),
}  # fmt: skip
CMS_FIELDS = tuple(k for k, v in APPLIES_TO.items() if v == CMS_VARIANTS and k != "cms")
# Fields added after states were first saved: at their defaults they stay out of `fingerprint`, so a state saved
# before they existed still loads into the model it came from.
LATER_FIELDS: tuple[str, ...] = ("eta_cap", "titans_paper_memory", "cms_chain")
RENAMED = {"weight_decay": "memory_decay", "momentum": "memory_momentum", "checkpoint": "activation_checkpointing",
           "attn_window": "window"}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that defines a model; `dataclasses.replace` or `presets.preset(..., **overrides)` to change it.

    Sizes: `vocab_size`, `d_model`, `n_layers`, `n_heads` (head dim = d_model / n_heads), `mlp_hidden`.
    Memories (D2-D6; the recurrent variants): `memory_kind`, `memory_expansion`, `memory_activation`, `mem_chunk`
    (C_mem), `proj_chunk` (C_proj, HOPE's self-modifying Titans only), `impl` ("auto": the GPU path where it
    applies on CUDA (the linear memory without clip; the MLP memory without Titans' branch LayerNorm), else
    "chunk", the PyTorch chunk form; "fused": the GPU path only (the linear memory's scan; the MLP memory's Triton
    kernels where the head's state fits on chip, its written-out backward otherwise); "lean": the chunk form with a
    memory-lean backward, about a third of the memory op's activation memory at two thirds of its speed;
    "adjoint": the MLP memory's hand-derived backward (chunk-start states only; elsewhere the chunk form); "naive":
    the per-token float64 reference of every memory; all the same function).
    Ablations (Table 6, docs/decisions.md): `dgd` (HOPE; the Titans variants always use plain GD),
    `memory_momentum` (the inner momentum beta), `memory_decay` (the retention gate alpha), `adaptive_k`,
    `adaptive_v` (False: the projection stays at its meta-learned initial state), `adaptive_q` (True: the query is
    a memory too; the default static query is the paper's final design). `normalize_v`: L2-normalise HOPE's
    generated values (the self-referential loop diverges without it). `inner_grad_clip`: per-token clip of the
    inner gradient of the Titans variants' plain-GD memories (`MemorySpec.max_grad_norm`; None turns it off;
    without it a MAG memory diverges within a few training steps).
    The paper's forms, one switch each (docs/decisions.md, "Departures from the paper"): `eta_cap` (the recurrent
    variants; True: every eta gate is capped at `1 / C`, C1; False: `sigmoid(.)` spans [0, 1] as in the papers, its
    bias set so that eta starts at the same value), `titans_paper_memory` (Titans variants; True: Titans §3.3's
    memory `x + LN(W1 σ(W2 x))` with no inner-gradient clip: `inner_grad_clip` is then None, and another value
    set with it is refused), `cms_chain` (chain and nested CMS; "residual": a residual per level and the level
    norm; "paper": Eq. 70 as printed, `y = MLP_k(... MLP_1(x))`, to which the block adds its residual, and
    `cms_level_norm` does not apply and setting it is refused).
    CMS (HOPE and Hope-Attention's MLP position, D9, D10): `cms` (False = the Table 6 "w/o CMS" ablation: one
    static SwiGLU), `cms_levels` (each level's chunk size, None = static, listed from slow to fast as Eqs. 70 and
    72 number them; the nested variant needs each chunk a multiple of the next; the hidden width `mlp_hidden` is
    per level), `cms_variant` ("chain", "nested", "independent"), `cms_lr` (per-token learning rate of the online
    levels: one value or one per level), `cms_learn_lr` (learning rates become parameters), `cms_meta_grad`
    ("first_order" or "full"), `cms_online_layers` (indices of the blocks whose levels learn online; None = every
    block, () = none: every level static), `cms_level_norm` (the chain's later levels read a normalised input;
    False is the un-normalised chain, which overflows float32 in training).
    Attention: `n_kv_heads` (grouped-query attention; None = n_heads), `qkv_bias` (Qwen2-style projection
    biases), `max_seq_len` (the longest context of full attention: Transformer++, Hope-Attention), `window` (the
    sliding window of the attention: None = full causal for Transformer++ / Hope-Attention, e.g. Mistral's
    window when set; Titans MAG / MAL always have one, `SWA_WINDOW` when None), `segment` (the MAC segment),
    `n_persistent` (learned persistent tokens, Titans Eq. 19), `rope_base`, `rope_scaling` (the RoPE frequency
    scaling of a converted checkpoint as sorted (key, value) pairs, e.g. `(("factor", 8.0), ...,
    ("rope_type", "llama3"))`; None = plain).
    `activation_checkpointing`: recompute each block in the backward pass instead of keeping its activations
    (same results, about one more forward pass of compute, a fraction of the memory). `memory_save_every` (the
    recurrent variants): which chunk-start states of a memory the MLP memory's written-out backward keeps ("auto"
    on CUDA, "fused", "adjoint"; `adjoint.memory_adjoint`): every chunk's (1), every n-th (n > 1; the backward
    recomputes the others from them: one more forward pass of the memory op), or none (0: recomputed from the
    layer's input state); HOPE's projection loop likewise keeps its state every n chunks and recomputes the
    segments between (activation checkpointing, any impl). Same results, the states' memory divided by n.
    `compile_projection` (HOPE): each whole `C_proj` chunk of the projection memories (generation and update) runs
    as one `torch.compile`d function shared by the layers (`self_modifying._compiled_step`; compiled at the first
    training call: minutes, about 370 s on the H200's host together with the main memory's kernels): ~150 kernels
    per chunk instead of ~330 launches; training calls only. The same results to float32 rounding as the
    autocast-free memory ops ("auto" on CUDA, "adjoint", "lean": its update runs with autocast off; under bf16
    autocast the "chunk" impl's update runs in bf16 and differs by that rounding). `compile_projection_budget`
    (0 < b <= 1, torch's `activation_memory_budget` for that compile): what the compiled step keeps for its
    backward, the rest recomputed there; 1 (default) keeps what torch's partitioner keeps by default (4.7x the
    written-out backward's saved bytes, measured on CPU), 0.05 keeps 0.63x of them (docs/decisions.md).
    """

    variant: Variant = "hope"
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 688
    memory_kind: Literal["mlp", "linear"] = "mlp"
    memory_expansion: int = 4
    memory_activation: Literal["silu", "gelu", "tanh"] = "silu"
    mem_chunk: int = 64
    proj_chunk: int = 64
    dgd: bool = True
    memory_momentum: bool = True
    memory_decay: bool = True
    adaptive_k: bool = True
    adaptive_v: bool = True
    adaptive_q: bool = False
    normalize_v: bool = True
    eta_cap: bool = True
    inner_grad_clip: float | None = INNER_GRAD_CLIP
    titans_paper_memory: bool = False
    cms: bool = True
    cms_levels: tuple[int | None, ...] = (None, 2048, 512)  # slow to fast (Eqs. 70, 72): the nested variant's order
    cms_variant: Literal["chain", "nested", "independent"] = "chain"
    cms_lr: float | tuple[float, ...] = 1e-3
    cms_learn_lr: bool = False
    cms_meta_grad: Literal["first_order", "full"] = "first_order"
    cms_online_layers: tuple[int, ...] | None = None
    cms_level_norm: bool = True
    cms_chain: Literal["residual", "paper"] = "residual"
    n_kv_heads: int | None = None
    qkv_bias: bool = False
    max_seq_len: int = 8192
    window: int | None = None
    segment: int = 512
    n_persistent: int = 64
    rope_base: float = 10000.0
    rope_scaling: tuple[Any, ...] | None = None  # (key, value) pairs
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-6
    impl: Literal["auto", "adjoint", "chunk", "fused", "lean", "naive"] = "auto"
    activation_checkpointing: bool = False
    memory_save_every: int = 1
    compile_projection: bool = False
    compile_projection_budget: float = 1.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if isinstance(self.cms_levels, list | tuple):  # `inf` and None both mean a static level
            levels = tuple(None if c == math.inf else c for c in self.cms_levels)
            object.__setattr__(self, "cms_levels", levels)
        coerce_fields(self)  # '3e-3' from YAML is a float, JSON lists are tuples (nestlearn/fields.py)
        self._check_applies()
        if self.variant in SLIDING_WINDOW and self.window is None:
            object.__setattr__(self, "window", SWA_WINDOW)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "memory_expansion", "mem_chunk",
                     "proj_chunk", "max_seq_len", "segment"):  # fmt: skip
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be a positive int or None (full attention), got {self.window!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}; "
                f"pick n_heads among the divisors of d_model (e.g. {_divisors_near(self.d_model, self.n_heads)})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model / n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        if self.n_persistent < 0:
            raise ValueError(f"n_persistent must be >= 0, got {self.n_persistent}")
        check_save_every(self.memory_save_every, "memory_save_every")
        if not 0 < self.compile_projection_budget <= 1:
            raise ValueError(f"compile_projection_budget must be in (0, 1], got {self.compile_projection_budget!r}")
        if self.inner_grad_clip is not None and not self.inner_grad_clip > 0:
            raise ValueError(f"inner_grad_clip must be > 0 or None (no clipping), got {self.inner_grad_clip!r}")
        self._check_titans_paper_memory()
        self._check_cms()
        clipped = self.variant in TITANS and self.inner_grad_clip is not None
        paper = self.variant in TITANS and self.titans_paper_memory
        if self.impl == "fused" and (paper or (clipped and self.memory_kind == "linear")):
            raise ValueError(
                "impl='fused' runs the MLP memory (clipped or not) and the linear memory without the gradient clip, "
                "never the branch LayerNorm (titans_paper_memory); use impl='auto', which takes the GPU path where it "
                "applies"
            )
        self._check_rope_scaling()
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads = {self.n_kv_heads} must be a positive divisor of n_heads = {self.n_heads}")

    def _check_applies(self) -> None:
        """Refuse a field set away from its default where it changes nothing (it would be silently ignored)."""
        for f in dataclasses.fields(self):
            if getattr(self, f.name) == f.default or applies(f.name, self.variant, cms=self.cms):
                continue
            if f.name in CMS_FIELDS and self.variant in CMS_VARIANTS:
                why = "cms=False (the Table 6 'w/o CMS' ablation has no CMS levels); remove it or set cms=True"
            else:
                why = f"variant {self.variant!r}; it applies to {', '.join(APPLIES_TO[f.name])}. Remove it"
            raise ValueError(f"{f.name} = {getattr(self, f.name)!r} does not apply to {why}")

    def _check_titans_paper_memory(self) -> None:
        """Titans §3.3's memory has no inner-gradient clip: the default clip is dropped (the config then says
        `inner_grad_clip=None`, what the model computes), another value is refused."""
        if not self.titans_paper_memory:
            return
        if self.inner_grad_clip not in (None, INNER_GRAD_CLIP):
            raise ValueError(
                f"titans_paper_memory=True is Titans' memory without an inner-gradient clip, but inner_grad_clip = "
                f"{self.inner_grad_clip!r} was set; remove inner_grad_clip or set titans_paper_memory=False"
            )
        if self.memory_kind != "mlp":
            raise ValueError(
                "titans_paper_memory=True is the residual MLP memory with a LayerNorm on its branch (Titans 3.3); "
                f"memory_kind = {self.memory_kind!r} has no branch to normalise: set memory_kind='mlp'"
            )
        object.__setattr__(self, "inner_grad_clip", None)

    def _check_cms(self) -> None:
        if self.cms_chain == "paper" and not self.cms_level_norm:
            raise ValueError(
                "cms_level_norm=False has no effect with cms_chain='paper' (Eq. 70's composition has no level norm); "
                "remove cms_level_norm"
            )
        if self.cms_chain == "paper" and self.cms_variant == "independent":
            raise ValueError(
                "cms_chain='paper' composes the levels (Eq. 70: chain and nested variants), but "
                "cms_variant='independent' sums them (Eq. 74); remove cms_chain or set cms_variant='chain'"
            )
        check_levels(self.cms_levels, self.cms_variant, self.level_lrs, self.cms_learn_lr, chain=self.cms_chain)
        for i in self.cms_online_layers or ():
            if not isinstance(i, int) or not 0 <= i < self.n_layers:
                raise ValueError(f"cms_online_layers holds {i!r}; block indices run from 0 to {self.n_layers - 1}")

    def _check_rope_scaling(self) -> None:
        """Store the scaling as sorted (key, value) tuples (hashable; JSON gives lists), then check it."""
        val = self.rope_scaling
        if val is None:
            return
        if not all(isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) for p in val):
            raise ValueError(
                f"rope_scaling must be (key, value) pairs such as tuple(sorted(d.items())), or None; got {val!r}"
            )
        object.__setattr__(self, "rope_scaling", tuple(sorted((k, v) for k, v in val)))
        check_rope_scaling(dict(self.rope_scaling))

    @property
    def uses_cms(self) -> bool:
        """Whether the MLP position holds a CMS (HOPE and Hope-Attention with `cms=True`)."""
        return self.cms and self.variant in ("hope", "hope_attention")

    @property
    def level_lrs(self) -> tuple[float, ...]:
        """One learning rate per CMS level."""
        lr = self.cms_lr
        return tuple(lr) if isinstance(lr, tuple) else (lr,) * len(self.cms_levels)

    def online_block(self, index: int) -> bool:
        """Whether block `index` carries online CMS levels."""
        return self.uses_cms and (self.cms_online_layers is None or index in self.cms_online_layers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A config from `to_dict` (also one saved under the earlier field names: see `upgrade`)."""
        d = upgrade(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Identifies the computation a state belongs to (`impl`, `activation_checkpointing` and
        `memory_save_every` change no result; the `LATER_FIELDS` count only when set away from their defaults)."""
        d = {k: v for k, v in self.to_dict().items() if k not in NO_RESULT_FIELDS}
        d = {k: v for k, v in d.items() if not (k in LATER_FIELDS and v == _DEFAULTS[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def applies(name: str, variant: str, *, cms: bool = True) -> bool:
    """Whether config field `name` changes a model of `variant` (with or without its CMS)."""
    if name in CMS_FIELDS and not cms:
        return False
    return variant in APPLIES_TO.get(name, VARIANTS)


def fields_for(variant: str, fields: dict[str, Any], *, cms: bool = True) -> dict[str, Any]:
    """The entries of `fields` that apply to `variant` (for code that builds several variants from one set)."""
    return {k: v for k, v in fields.items() if k == "variant" or applies(k, variant, cms=cms)}


def upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict under today's field names. Configs written before the rename hold `weight_decay`,
    `momentum`, `checkpoint`, and two windows (`attn_window` for full attention, `window` for MAG / MAL); they
    also hold every field at some value, including fields that changed nothing for their variant, which are
    dropped here (their values never had an effect)."""
    if not any(k in d for k in RENAMED):
        return dict(d)
    variant = d.get("variant", "hope")
    old = dict(d)
    attn_window, swa_window = old.pop("attn_window", None), old.pop("window", None)
    new = {RENAMED.get(k, k): v for k, v in old.items()}
    new["window"] = attn_window if variant in FULL_ATTENTION else swa_window if variant in SLIDING_WINDOW else None
    if variant in ("titans_mac", "titans_mag"):  # their attention took no RoPE settings then: keep what it computed
        new.pop("rope_base", None), new.pop("rope_scaling", None)
    return fields_for(variant, new, cms=bool(new.get("cms", True)))


def _divisors_near(n: int, h: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0 and (n // d) % 2 == 0]
    return sorted(divs, key=lambda d: abs(d - h))[:3]
