"""The default CMS levels run from slow to fast, so every CMS variant, nested included, accepts them.

What this pins: `ModelConfig().cms_levels` is `(None, 2048, 512)`, the order in which Eqs. 70 and 72 number the
levels (lowest frequency first: the static level, then the 2048-token level, then the 512-token one), each chunk a
multiple of the next; the nested variant accepts the defaults (it refused the former `(None, 512, 2048)`, which
it still refuses when given explicitly) and a nested model built from the defaults updates its 512-token level at
its first boundary. The measurement behind the change: docs/results/cms_order.md, docs/decisions.md (*Default levels*).
What this is not: the CMS equations (tests/layers/test_cms.py) or the online driver (tests/models/test_online.py).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nestlearn.models import CausalLM, ModelConfig, preset
from nestlearn.models.presets import PRESETS


def test_default_levels_run_slow_to_fast() -> None:
    levels = ModelConfig().cms_levels
    assert levels == (None, 2048, 512)
    periods = [math.inf if c is None else c for c in levels]
    assert periods == sorted(periods, reverse=True)
    online = [c for c in levels if c is not None]
    assert all(a % b == 0 for a, b in itertools.pairwise(online))


@pytest.mark.parametrize("variant", ["hope", "hope_attention"])
def test_nested_accepts_the_defaults(variant: str) -> None:
    """The presets leave the levels at the default (they solve only the MLP width)."""
    assert all("cms_levels" not in p for p in PRESETS.values())
    cfg = preset("debug", variant, cms_variant="nested")
    assert cfg.cms_levels == ModelConfig().cms_levels and cfg.cms_variant == "nested"
    with pytest.raises(ValueError, match="level chunk 512 is not a multiple of the next level's 2048"):
        ModelConfig(variant=variant, cms_levels=(None, 512, 2048), cms_variant="nested")


def test_nested_model_with_the_default_levels_learns_every_512_tokens() -> None:
    """A one-block Hope-Attention at the debug preset's shape, shrunk: after 511 tokens no level has moved; after
    520 (past the first 512-token boundary, whichever token the driver waits for to take that segment's gradient)
    the 512-token level (the last, fastest one) has, and the 2048-token level has not."""
    torch.manual_seed(0)
    cfg = preset("debug", "hope_attention", cms_variant="nested", cms_lr=0.1, n_layers=1, d_model=32, n_heads=2,
                 mlp_hidden=16, vocab_size=16)  # fmt: skip
    model = CausalLM(cfg).double()
    ids = torch.randint(0, 16, (1, 520))
    initial = model.init_state(1).blocks[0].cms.levels
    with torch.no_grad():
        _, before = model(ids[:, :511])
        _, after = model(ids)
    moved = [[lv is not None and not all(map(torch.equal, lv.weights, lv0.weights))
              for lv, lv0 in zip(state.blocks[0].cms.levels, initial, strict=True)]
             for state in (before, after)]  # fmt: skip
    assert moved == [[False, False, False], [False, False, True]]
