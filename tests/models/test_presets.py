"""Size presets: every variant of every preset within 5% of its name (parameters counted on the meta device)."""

from __future__ import annotations

import pytest

from nestlearn.models import PRESETS, VARIANTS, CausalLM, count_parameters, preset

NOMINAL = {"debug": 1e6, "20M": 20e6, "60M": 60e6, "125M": 125e6, "340M": 340e6, "760M": 760e6, "1.3B": 1.3e9}


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_match_names(name: str) -> None:
    for variant in VARIANTS:
        n = count_parameters(preset(name, variant))
        assert abs(n / NOMINAL[name] - 1) < 0.05, f"{name} {variant}: {n:,} parameters"


def test_large_presets_follow_titans_table5() -> None:
    """Width / depth / heads of 340M, 760M, 1.3B as in Titans' Table 5."""
    dims = {n: (preset(n).d_model, preset(n).n_layers, preset(n).n_heads) for n in ("340M", "760M", "1.3B")}
    assert dims == {"340M": (1024, 24, 16), "760M": (1536, 24, 16), "1.3B": (2048, 18, 8)}


def test_count_matches_a_built_model_and_overrides_apply() -> None:
    cfg = preset("debug", "hope", vocab_size=300, mem_chunk=16)
    assert cfg.vocab_size == 300 and cfg.mem_chunk == 16
    assert count_parameters(cfg) == sum(p.numel() for p in CausalLM(cfg).parameters())
    assert preset("debug", "hope", mlp_hidden=40).mlp_hidden == 40


def test_impossible_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        preset("debug", "hope", vocab_size=50257)
