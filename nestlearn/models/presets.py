"""The size presets: one dial (`preset(name, variant)`) from a debug model to 1.3B parameters.

What this is: `PRESETS` (target parameters, width, depth, heads, vocabulary) and `preset`, which solves the
SwiGLU hidden width per variant so that every variant of a preset has the same total parameter count (tied
embeddings, the preset's vocabulary). That makes "equal size" comparisons fair: self-modifying Titans spends
parameters on its memories' meta-learned initial states, the Titans hybrids on a second mixer, and the MLP gives
them back. Width, depth and heads follow Titans' Table 5 where it has the size (340M, 760M, 1.3B) and GPT-style
shapes below it. What it is not: the config type (`config.py`) or the model (`lm.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ModelConfig
from .lm import count_parameters

PRESETS: dict[str, dict[str, int]] = {
    "debug": dict(params=1_000_000, d_model=128, n_layers=4, n_heads=8, vocab_size=256),
    "20M": dict(params=20_000_000, d_model=256, n_layers=10, n_heads=8, vocab_size=32000),
    "60M": dict(params=60_000_000, d_model=512, n_layers=12, n_heads=8, vocab_size=32000),
    "125M": dict(params=125_000_000, d_model=768, n_layers=12, n_heads=12, vocab_size=32000),
    "340M": dict(params=340_000_000, d_model=1024, n_layers=24, n_heads=16, vocab_size=32000),
    "760M": dict(params=760_000_000, d_model=1536, n_layers=24, n_heads=16, vocab_size=32000),
    "1.3B": dict(params=1_300_000_000, d_model=2048, n_layers=18, n_heads=8, vocab_size=32000),
}


# Table 6 of the paper (HOPE's ablations): each row -> the fields that build it. The paper's "Hope" row has an
# adaptive query (its "w/o inner-projection q" row makes q static); nestlearn's default HOPE is that row: a static
# query, the paper's final design. docs/equations.md lists the rows with the paper's numbers.
TABLE6: dict[str, dict[str, Any]] = {
    "hope": dict(adaptive_q=True),
    "w/o dgd": dict(adaptive_q=True, dgd=False),
    "w/o momentum": dict(adaptive_q=True, memory_momentum=False),
    "w/o weight decay": dict(adaptive_q=True, memory_decay=False),
    "w/o cms": dict(adaptive_q=True, cms=False),
    "w/o inner-projection k": dict(adaptive_q=True, adaptive_k=False),
    "w/o inner-projection v": dict(adaptive_q=True, adaptive_v=False),
    "w/o inner-projection q": dict(),
}
DEFAULT_TABLE6_ROW = "w/o inner-projection q"


def ablation_fields(ablation: str) -> dict[str, Any]:
    """The fields of a Table 6 row (case-insensitive), e.g. "w/o DGD"; ValueError listing the rows."""
    key = ablation.strip().lower()
    if key not in TABLE6:
        raise ValueError(f"unknown Table 6 row {ablation!r}; choose one of {', '.join(map(repr, TABLE6))}")
    return dict(TABLE6[key])


def preset(name: str, variant: str = "hope", *, ablation: str | None = None, **overrides: Any) -> ModelConfig:
    """The config of a named size for a variant; the MLP hidden width is solved to hit the size.

    `ablation` builds a row of the paper's Table 6 (HOPE only, `TABLE6`: "hope", "w/o DGD", ...); `overrides` may
    change any field that applies to the variant (e.g. `vocab_size=50257`, `mem_chunk=16`, `dgd=False`) and are
    applied after the row. The hidden width is solved after them unless `mlp_hidden` is given, so every row has
    the same parameter count.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if ablation is not None:
        if variant != "hope":
            raise ValueError(f"Table 6 ablations are rows of HOPE; use variant='hope', not {variant!r}")
        overrides = {**ablation_fields(ablation), **overrides}
    p = dict(PRESETS[name])
    target = p.pop("params")
    cfg = ModelConfig(variant=variant, **{**p, **overrides})  # type: ignore[arg-type]
    if "mlp_hidden" in overrides:
        return cfg
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
