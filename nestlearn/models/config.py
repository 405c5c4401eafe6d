"""One typed configuration for every model of the family, and the size presets.

What this is: `ModelConfig` (variant, sizes, memory and chunking, Table 6 ablation switches, attention limits),
checked on construction with messages that name the fix, and `preset(name, variant)`, the one size dial.
What it is not: the model (`lm.py`) or the training configuration (a later issue).

Presets: the width, depth and head count follow Titans' Table 5 where it has the size (340M, 760M, 1.3B:
`paper.md` §5.3) and GPT-style shapes below it; the SwiGLU hidden width is then solved per variant so that every
variant of a preset has the same total parameter count (tied embeddings, the preset's vocabulary), which makes
"equal size" comparisons fair: self-modifying Titans spends parameters on its memories' meta-learned initial
states, the Titans hybrids on a second mixer, and the MLP gives them back.
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

Variant = Literal["hope", "hope_attention", "titans_lmm", "titans_mac", "titans_mag", "titans_mal", "transformer"]
VARIANTS: tuple[str, ...] = Variant.__args__  # type: ignore[attr-defined]
RECURRENT: tuple[str, ...] = ("hope", "titans_lmm", "titans_mac", "titans_mag", "titans_mal")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that defines a model; `dataclasses.replace` or `preset(..., **overrides)` to change it.

    Sizes: `vocab_size`, `d_model`, `n_layers`, `n_heads` (head dim = d_model / n_heads), `mlp_hidden`.
    Memories (D2-D6): `memory_kind`, `memory_expansion`, `memory_activation`, `mem_chunk` (C_mem),
    `proj_chunk` (C_proj, self-modifying Titans only).
    Ablations (Table 6): `dgd` (self-modifying Titans; Titans variants always use plain GD), `momentum`,
    `weight_decay` (the retention gate alpha), `adaptive_k`, `adaptive_v` (False: the projection stays at its
    meta-learned initial state), `adaptive_q` (True: the query is a memory too; the paper's final design and our
    default is a static query). `normalize_v`: L2-normalise self-modifying Titans' generated values
    (docs/decisions.md: the self-referential loop diverges without it). `inner_grad_clip`: per-token clip of the
    inner gradient of the Titans variants' plain-GD memories (`MemorySpec.max_grad_norm`; None turns it off;
    docs/decisions.md: without it a MAG memory diverges within a few training steps).
    CMS (HOPE and Hope-Attention's MLP position, D9, D10; docs/decisions.md): `cms` (False = the Table 6 "w/o
    CMS" ablation: one static SwiGLU), `cms_levels` (each level's chunk size, None = static; the hidden width
    `mlp_hidden` is per level), `cms_variant` ("chain", "nested", "independent"), `cms_lr` (per-token learning
    rate of the online levels: one value or one per level), `cms_learn_lr` (learning rates become parameters),
    `cms_meta_grad` ("first_order" or "full"), `cms_online_layers` (indices of the blocks whose levels learn
    online; None = every block, () = none: every level static), `cms_level_norm` (the chain's later levels read
    a normalised input; False is the un-normalised chain, which overflows float32 in training: docs/decisions.md,
    "Stability and denormals").
    Attention: `n_kv_heads` (grouped-query attention; None = n_heads), `qkv_bias` (Qwen2-style projection
    biases), `attn_window` (a sliding window for the full-attention variants, e.g. Mistral's); `max_seq_len`
    bounds full attention (Transformer++, Hope-Attention); `window` is the sliding window
    of MAG / MAL; `segment` the MAC segment; `n_persistent` learned persistent tokens (Titans Eq. 19).
    `rope_scaling`: the RoPE frequency scaling of a converted checkpoint (`RotaryEmbedding`) as sorted (key, value)
    pairs, e.g. `(("factor", 8.0), ..., ("rope_type", "llama3"))` (`tuple(sorted(d.items()))`); None = plain.
    `impl`: "chunk" or "naive" (the per-token float64 reference of every memory; same results, slow).
    `checkpoint`: recompute each block in the backward pass instead of keeping its activations (activation
    checkpointing; same results, about one more forward pass of compute, a fraction of the memory).
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
    momentum: bool = True
    weight_decay: bool = True
    adaptive_k: bool = True
    adaptive_v: bool = True
    adaptive_q: bool = False
    normalize_v: bool = True
    inner_grad_clip: float | None = INNER_GRAD_CLIP
    cms: bool = True
    cms_levels: tuple[int | None, ...] = (None, 512, 2048)
    cms_variant: Literal["chain", "nested", "independent"] = "chain"
    cms_lr: float | tuple[float, ...] = 1e-3
    cms_learn_lr: bool = False
    cms_meta_grad: Literal["first_order", "full"] = "first_order"
    cms_online_layers: tuple[int, ...] | None = None
    cms_level_norm: bool = True
    n_kv_heads: int | None = None
    qkv_bias: bool = False
    attn_window: int | None = None
    max_seq_len: int = 8192
    window: int = 2048
    segment: int = 512
    n_persistent: int = 64
    rope_base: float = 10000.0
    rope_scaling: tuple[Any, ...] | None = None  # (key, value) pairs
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-6
    impl: Literal["chunk", "naive"] = "chunk"
    checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if isinstance(self.cms_levels, list | tuple):  # `inf` and None both mean a static level
            levels = tuple(None if c == math.inf else c for c in self.cms_levels)
            object.__setattr__(self, "cms_levels", levels)
        coerce_fields(self)  # '3e-3' from YAML is a float, JSON lists are tuples (nestlearn/fields.py)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "memory_expansion", "mem_chunk",
                     "proj_chunk", "max_seq_len", "window", "segment"):  # fmt: skip
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}; "
                f"pick n_heads among the divisors of d_model (e.g. {_divisors_near(self.d_model, self.n_heads)})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model / n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        if self.n_persistent < 0:
            raise ValueError(f"n_persistent must be >= 0, got {self.n_persistent}")
        if self.inner_grad_clip is not None and not self.inner_grad_clip > 0:
            raise ValueError(f"inner_grad_clip must be > 0 or None (no clipping), got {self.inner_grad_clip!r}")
        self._check_cms()
        self._check_rope_scaling()
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads = {self.n_kv_heads} must be a positive divisor of n_heads = {self.n_heads}")

    def _check_cms(self) -> None:
        check_levels(self.cms_levels, self.cms_variant, self.level_lrs, self.cms_learn_lr)
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Identifies the computation a state belongs to (`impl` and `checkpoint` change no result)."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("impl", "checkpoint")}
        if d["rope_scaling"] is None:  # configs from before the field keep their fingerprint (saved states)
            del d["rope_scaling"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _divisors_near(n: int, h: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0 and (n // d) % 2 == 0]
    return sorted(divs, key=lambda d: abs(d - h))[:3]


# ---------------------------------------------------------------------------------------------
# size presets: target parameters, width, depth, heads, vocabulary

PRESETS: dict[str, dict[str, int]] = {
    "debug": dict(params=1_000_000, d_model=128, n_layers=4, n_heads=8, vocab_size=256),
    "20M": dict(params=20_000_000, d_model=256, n_layers=10, n_heads=8, vocab_size=32000),
    "60M": dict(params=60_000_000, d_model=512, n_layers=12, n_heads=8, vocab_size=32000),
    "125M": dict(params=125_000_000, d_model=768, n_layers=12, n_heads=12, vocab_size=32000),
    "340M": dict(params=340_000_000, d_model=1024, n_layers=24, n_heads=16, vocab_size=32000),
    "760M": dict(params=760_000_000, d_model=1536, n_layers=24, n_heads=16, vocab_size=32000),
    "1.3B": dict(params=1_300_000_000, d_model=2048, n_layers=18, n_heads=8, vocab_size=32000),
}


def preset(name: str, variant: str = "hope", **overrides: Any) -> ModelConfig:
    """The config of a named size for a variant; the MLP hidden width is solved to hit the size.

    `overrides` may change anything (e.g. `vocab_size=50257`, `mem_chunk=16`, `dgd=False`); the hidden width
    is solved after them unless `mlp_hidden` is given.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = dict(PRESETS[name])
    target = p.pop("params")
    cfg = ModelConfig(variant=variant, **{**p, **overrides})  # type: ignore[arg-type]
    if "mlp_hidden" in overrides:
        return cfg
    from .lm import count_parameters  # the model defines what a parameter is

    fixed = count_parameters(dataclasses.replace(cfg, mlp_hidden=1)) - _mlp_params(cfg, 1)
    per_unit = _mlp_params(cfg, 2) - _mlp_params(cfg, 1)
    hidden = round((target - fixed) / per_unit / 16) * 16
    if hidden < 16:
        raise ValueError(
            f"preset {name!r} cannot hold a {variant} model with these settings ({fixed:,} parameters before the "
            "MLP); use a larger preset or a smaller vocabulary / memory expansion"
        )
    return dataclasses.replace(cfg, mlp_hidden=hidden)


def _mlp_params(cfg: ModelConfig, hidden: int) -> int:
    """Parameters of all SwiGLU MLPs (every CMS level) at a given hidden width."""
    levels = len(cfg.cms_levels) if cfg.uses_cms else 1
    return cfg.n_layers * levels * 3 * cfg.d_model * hidden
