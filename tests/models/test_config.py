"""The model configuration: one meaning per field, fields that do not apply to a variant refused, configs saved
under the earlier field names read back, and the renamed names pointed out to the user.
What this is not: the presets (`test_presets.py`) or the CMS level checks (`test_online.py`)."""

from __future__ import annotations

import dataclasses

import pytest

from nestlearn.models import VARIANTS, CausalLM, ModelConfig
from nestlearn.models.config import APPLIES_TO, CMS_FIELDS, SWA_WINDOW, applies, upgrade
from nestlearn.train.config import check_model_overrides

DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
# a value other than the default for every field that applies to some variants only
OTHER = {
    "memory_kind": "linear", "memory_expansion": 2, "memory_activation": "gelu", "mem_chunk": 16,
    "memory_momentum": False, "memory_decay": False, "impl": "naive", "proj_chunk": 16, "dgd": False,
    "adaptive_k": False, "adaptive_v": False, "adaptive_q": True, "normalize_v": False, "inner_grad_clip": 1.0,
    "cms": False, "cms_levels": (None, 64), "cms_variant": "independent", "cms_lr": 1e-2, "cms_learn_lr": True,
    "cms_meta_grad": "full", "cms_online_layers": (0,), "cms_level_norm": False, "n_kv_heads": 2, "qkv_bias": True,
    "max_seq_len": 1024, "window": 128, "segment": 64, "n_persistent": 8, "rope_base": 5e5,
    "rope_scaling": (("factor", 2.0), ("rope_type", "linear")), "eta_cap": False, "titans_paper_memory": True,
    "cms_chain": "paper", "memory_save_every": 0, "compile_projection": True,
    "compile_projection_budget": 0.5,
}  # fmt: skip


def test_every_restricted_field_is_a_field_with_another_value() -> None:
    assert set(APPLIES_TO) == set(OTHER) and set(APPLIES_TO) <= set(DEFAULTS)
    assert all(OTHER[k] != DEFAULTS[k] for k in OTHER)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_field_is_accepted_exactly_where_it_applies(variant: str) -> None:
    """Every restricted field, set away from its default: accepted where it changes the model, refused with the
    variants it applies to where it would be ignored."""
    for name, value in OTHER.items():
        if applies(name, variant):
            extra = {"cms_lr": (1e-2, 1e-2)} if name == "cms_levels" else {}
            extra |= {"cms_levels": (64,)} if name == "cms_learn_lr" else {}
            ModelConfig(variant=variant, n_heads=4, **{name: value, **extra})
        else:
            with pytest.raises(ValueError, match=rf"{name} = .* does not apply to variant '{variant}'; it applies to"):
                ModelConfig(variant=variant, **{name: value})


@pytest.mark.parametrize("name", CMS_FIELDS)
def test_cms_fields_are_refused_without_the_cms(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} = .* does not apply to cms=False"):
        ModelConfig(variant="hope", cms=False, **{name: OTHER[name]})


def test_one_window_field() -> None:
    """`window` is the attention's sliding window for every variant that has one: full causal by default for
    Transformer++ / Hope-Attention, SWA_WINDOW for MAG / MAL, which always have a window."""
    assert ModelConfig(variant="transformer").window is None
    assert ModelConfig(variant="titans_mag").window == ModelConfig(variant="titans_mal").window == SWA_WINDOW
    assert CausalLM(ModelConfig(variant="transformer", window=7, vocab_size=8, d_model=8, n_heads=2,
                                n_layers=1, mlp_hidden=8)).blocks[0].mixers[0].window == 7  # fmt: skip
    with pytest.raises(ValueError, match="window must be a positive int or None"):
        ModelConfig(variant="transformer", window=0)


def test_configs_saved_under_the_earlier_names_read_back() -> None:
    """`weight_decay` / `momentum` / `checkpoint` were renamed and the two windows merged; a saved dict of the
    earlier layout (every field present, some with no effect for its variant) loads as the same model."""
    earlier = {k: v for k, v in DEFAULTS.items() if k not in ("memory_decay", "memory_momentum",
                                                             "activation_checkpointing", "window")}  # fmt: skip
    earlier |= {"weight_decay": False, "momentum": True, "checkpoint": True, "window": 2048, "attn_window": 4096}
    assert ModelConfig.from_dict({**earlier, "variant": "transformer"}).window == 4096
    mag = ModelConfig.from_dict({**earlier, "variant": "titans_mag", "window": 512})
    assert mag.window == 512 and not mag.memory_decay and mag.activation_checkpointing
    hope = ModelConfig.from_dict({**earlier, "variant": "hope", "mem_chunk": 16})
    assert hope.window is None and hope.mem_chunk == 16 and not hope.memory_decay and hope.memory_momentum
    assert upgrade(hope.to_dict()) == hope.to_dict()  # today's dicts pass through unchanged


def test_renamed_override_names_the_new_name() -> None:
    with pytest.raises(ValueError, match=r"model_overrides\.weight_decay is now called 'memory_decay'"):
        check_model_overrides({"weight_decay": False})
    assert check_model_overrides({"memory_decay": "false"}) == {"memory_decay": False}


def test_earlier_mac_and_mag_configs_keep_their_attention() -> None:
    """MAC / MAG attention took no RoPE settings before the rename, so a saved rope_base had no effect: dropped."""
    old = {"variant": "titans_mag", "weight_decay": True, "window": 512, "attn_window": None, "rope_base": 5e5}
    assert ModelConfig.from_dict(old).rope_base == DEFAULTS["rope_base"]
    assert ModelConfig.from_dict({**old, "variant": "titans_mal"}).rope_base == 5e5  # MAL's attention always took it


def test_compile_projection_budget_is_checked() -> None:
    assert ModelConfig(variant="hope", compile_projection_budget=0.05).compile_projection_budget == 0.05
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match=r"compile_projection_budget must be in \(0, 1\]"):
            ModelConfig(variant="hope", compile_projection_budget=bad)


def test_memory_save_every_is_checked() -> None:
    assert ModelConfig(variant="hope", memory_save_every=0).memory_save_every == 0
    with pytest.raises(ValueError, match="memory_save_every must be an int >= 0"):
        ModelConfig(variant="hope", memory_save_every=-1)
    for bad in (True, 2.5, None):
        with pytest.raises(ValueError, match="memory_save_every: expected an integer"):
            ModelConfig(variant="hope", memory_save_every=bad)


def test_fused_impl_only_where_the_kernels_apply() -> None:
    ModelConfig(variant="titans_lmm", memory_kind="linear", inner_grad_clip=None, impl="fused")
    ModelConfig(variant="titans_lmm", inner_grad_clip=None, impl="fused")  # the MLP memory's kernels
    ModelConfig(variant="titans_lmm", impl="fused")  # with the clip: the MLP kernels take it
    ModelConfig(variant="hope", memory_kind="linear", impl="fused")  # HOPE's memories have no clip
    ModelConfig(variant="hope", impl="fused")
    bad = (dict(variant="titans_lmm", memory_kind="linear"), dict(variant="titans_mag", titans_paper_memory=True))
    for kw in bad:
        with pytest.raises(ValueError, match=r"impl='fused' runs the MLP memory \(clipped or not\) and the linear"):
            ModelConfig(impl="fused", **kw)


def test_resume_ignores_fields_that_change_no_result() -> None:
    """A run saved with impl='chunk' (the earlier default) or other activation checkpointing is the same model."""
    from types import SimpleNamespace

    from nestlearn.train.checkpoints import differences
    from nestlearn.train.config import TrainConfig

    cfg = ModelConfig(variant="titans_mac", vocab_size=64, d_model=32, n_heads=2, n_layers=1, mlp_hidden=32)
    saved = {**dataclasses.asdict(cfg), "impl": "chunk", "activation_checkpointing": True}
    shards = SimpleNamespace(meta={"files": {}})
    run = SimpleNamespace(cfg=TrainConfig(data="d"), core=SimpleNamespace(config=cfg), shards=shards)
    assert differences({"model_config": saved, "config": {}}, run) == {}
    saved["mem_chunk"] = 32
    assert "model" in differences({"model_config": saved, "config": {}}, run)
