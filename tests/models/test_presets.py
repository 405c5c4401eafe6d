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


def test_table6_rows_build_hope_ablations_of_equal_size() -> None:
    """Each row of the paper's Table 6 is one config of the factory; the default HOPE is the "w/o inner-projection q"
    row (static q); every row has the preset's parameter count within 2 % (the MLP width moves in steps of 16)."""
    from nestlearn.models.presets import DEFAULT_TABLE6_ROW, TABLE6

    assert preset("debug", ablation=DEFAULT_TABLE6_ROW) == preset("debug", "hope")
    rows = {r: preset("debug", ablation=r) for r in TABLE6}
    assert rows["hope"].adaptive_q and not rows["w/o dgd"].dgd and not rows["w/o cms"].cms
    assert not rows["w/o momentum"].memory_momentum and not rows["w/o weight decay"].memory_decay
    assert not rows["w/o inner-projection k"].adaptive_k and not rows["w/o inner-projection v"].adaptive_v
    sizes = [count_parameters(c) for c in rows.values()]
    assert max(sizes) / min(sizes) < 1.02, sizes
    assert preset("debug", ablation="W/O DGD", mem_chunk=16).mem_chunk == 16  # case-insensitive; overrides apply
    with pytest.raises(ValueError, match="unknown Table 6 row 'w/o foo'; choose one of 'hope'"):
        preset("debug", ablation="w/o foo")
    with pytest.raises(ValueError, match="rows of HOPE; use variant='hope'"):
        preset("debug", "transformer", ablation="w/o dgd")
