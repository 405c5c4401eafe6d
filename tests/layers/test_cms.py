"""The CMS layer: each variant's forward against a hand-written composition of its levels, the update rule
of Eq. 71 (sum of a chunk's gradients applied at its boundary) and the nested restart of Eq. 72, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers.cms import CMS


def make(variant: str = "chain", chunks=(None, 4, 2), lr=(0.0, 0.5, 0.25), **kw) -> CMS:
    torch.manual_seed(0)
    return CMS(6, 5, chunks, variant=variant, lr=lr, **kw).double()


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.mT) * (x @ up.mT)) @ down.mT


def level_weights(cms: CMS, state, i: int):
    """Level i's weights as `[B, ...]` tensors (fast weights, or the static parameters broadcast)."""
    if state.levels[i] is not None:
        return state.levels[i].weights
    lv = cms.levels[i]
    return tuple(m.weight[None] for m in (lv.gate, lv.up, lv.down))


def rms(z: torch.Tensor) -> torch.Tensor:
    return z / (z.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()


@pytest.mark.parametrize(
    ("variant", "level_norm"), [("chain", True), ("chain", False), ("nested", True), ("independent", True)]
)
def test_forward_matches_its_equation(variant: str, level_norm: bool) -> None:
    """chain: z_1 = x + MLP_1(x), z_l = z_{l-1} + MLP_l(N(z_{l-1})) with N the RMS normalisation (no N with
    level_norm=False), y = z_k - x (Eq. 70); independent: sum_l a_l MLP_l(x) (Eq. 74)."""
    cms = make(variant, level_norm=level_norm)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    state = cms.init_state(2)
    state = cms.step(state, [torch.randn_like(w) for w in cms.fast_weights(state)], end=4)  # weights differ
    y = cms(x, state)
    ws = [level_weights(cms, state, i) for i in range(3)]
    if variant == "independent":
        ref = sum(cms.mix[i] * swiglu(x, *ws[i]) for i in range(3))
    else:
        z = x
        for i, w in enumerate(ws):
            z = z + swiglu(rms(z) if i > 0 and level_norm else z, *w)
        ref = z - x
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


def test_one_level_is_the_plain_mlp() -> None:
    """With one static level every variant is `MLP(x)`: the Transformer MLP is the k = 1 CMS (§7.1)."""
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    for variant in ("chain", "nested", "independent"):
        cms = make(variant, chunks=(None,), lr=(0.0,))
        torch.testing.assert_close(cms(x, cms.init_state(2)), cms.levels[0](x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("variant", ["chain", "nested"])
def test_level_norm_bounds_the_chain_gain(variant: str) -> None:
    """A SwiGLU is homogeneous of degree 2, so without the norm every later level squares the scale of
    what it reads. With every level's weights 4x their initial size (what 100 AdamW steps at lr 1e-2 did to a tiny
    HOPE's levels: mean |w| 0.016 -> 0.06), the three-level chain's output is 1e9 without the norm, 39 with it."""
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    sizes = {}
    for level_norm in (True, False):
        cms = make(variant, chunks=(None, None, None), lr=(0.0, 0.0, 0.0), level_norm=level_norm)
        with torch.no_grad():
            for p in cms.levels.parameters():
                p.mul_(4.0)
            sizes[level_norm] = cms(x, cms.init_state(2)).abs().max().item()
    assert sizes[True] < 1e3 < 1e5 < sizes[False], sizes


def test_step_sums_gradients_and_applies_them_at_boundaries() -> None:
    """Eq. 71: level l adds every segment's gradient and moves by -lr_l * sum only when end % C_l == 0."""
    cms = make("chain", chunks=(None, 4, 2), lr=(0.0, 0.5, 0.25))
    st0 = cms.init_state(1)
    g = [[torch.randn_like(w) for w in cms.fast_weights(st0)] for _ in range(2)]
    st1 = cms.step(st0, g[0], end=2)  # boundary of level 2 only
    st2 = cms.step(st1, g[1], end=4)  # boundary of both
    for j in range(3):
        w1, w2 = st0.levels[1].weights[j], st0.levels[2].weights[j]
        torch.testing.assert_close(st1.levels[1].weights[j], w1)  # level 1 waits
        torch.testing.assert_close(st1.levels[1].grads[j], g[0][j])
        torch.testing.assert_close(st1.levels[2].weights[j], w2 - 0.25 * g[0][3 + j])
        torch.testing.assert_close(st2.levels[1].weights[j], w1 - 0.5 * (g[0][j] + g[1][j]))
        torch.testing.assert_close(st2.levels[2].weights[j], w2 - 0.25 * (g[0][3 + j] + g[1][3 + j]))
        assert not st2.levels[1].grads[j].any() and not st2.levels[2].grads[j].any()


def test_nested_restarts_from_the_start_its_parent_learns() -> None:
    """Eq. 72: at a boundary of level 1 (C = 4), level 2 (C = 2) returns to its start point, which moved by
    -lr_1 * (level 2's gradients since level 1's last boundary)."""
    cms = make("nested", chunks=(None, 4, 2), lr=(0.0, 0.5, 0.25))
    st = cms.init_state(1)
    start = st.levels[2].start
    g = [[torch.randn_like(w) for w in cms.fast_weights(st)] for _ in range(2)]
    mid = cms.step(st, g[0], end=2)
    end = cms.step(mid, g[1], end=4)
    for j in range(3):
        torch.testing.assert_close(mid.levels[2].weights[j], start[j] - 0.25 * g[0][3 + j])  # its own update first
        moved = start[j] - 0.5 * (g[0][3 + j] + g[1][3 + j])
        torch.testing.assert_close(end.levels[2].start[j], moved)
        torch.testing.assert_close(end.levels[2].weights[j], moved)  # restarted there
    assert st.levels[1].start == ()  # level 1's parent is static: it never restarts


def test_learnable_rates_are_parameters() -> None:
    cms = make(lr=(0.1, 0.5, 0.25), learn_lr=True)
    assert isinstance(cms.log_lr, torch.nn.Parameter)
    torch.testing.assert_close(cms.lr, torch.tensor([0.1, 0.5, 0.25], dtype=torch.float64))
    assert make(lr=(0.1, 0.5, 0.25)).lr == (0.1, 0.5, 0.25)  # fixed rates stay exact Python floats


def test_offline_layer_has_only_static_levels() -> None:
    cms = make(online=False)
    assert cms.online_levels == () and cms.init_state(2).levels == (None, None, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(chunks=()), "at least one level"),
        (dict(chunks=(None, 0), lr=(0.0, 0.1)), "positive ints or None"),
        (dict(chunks=(None, -4), lr=(0.0, 0.1)), "positive ints or None"),
        (dict(chunks=(None, 4), lr=(0.1,)), "one CMS learning rate per level"),
        (dict(chunks=(None, 4), lr=(0.0, -1.0)), "finite and >= 0"),
        (dict(chunks=(None, 4), lr=(0.0, 0.1), learn_lr=True), "must start > 0"),
        (dict(chunks=(4, 6), lr=(0.1, 0.1), variant="nested"), "multiple of the next"),
        (dict(chunks=(4,), lr=(0.1,), variant="tree"), "variant must be"),
    ],
)
def test_bad_levels_name_the_fix(kwargs: dict, match: str) -> None:
    args = dict(chunks=(None, 4, 2), lr=(0.0, 0.5, 0.25), variant="chain") | kwargs
    with pytest.raises(ValueError, match=match):
        CMS(6, 5, args.pop("chunks"), **args)
