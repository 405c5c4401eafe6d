"""Saving and loading the learning state: a deployed model continues exactly where it stopped."""

from __future__ import annotations

import pytest
import torch

from nestlearn.models import load_state, save_state
from tests.models.test_lm import tiny


@pytest.mark.parametrize("variant", ["hope", "titans_mac", "titans_mal", "transformer"])
def test_save_load_continue(tmp_path, variant: str) -> None:
    """Read 11 tokens, save (mid-chunk, mid-segment), load into a fresh model object, read 8 more == one pass."""
    model = tiny(variant)
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        full, _ = model(ids)
        _, st = model(ids[:, :11])
        save_state(st, tmp_path)
        fresh = tiny(variant)
        fresh.load_state_dict(model.state_dict())
        out, _ = fresh(ids[:, 11:], load_state(tmp_path, fresh))
    torch.testing.assert_close(out, full[:, 11:], rtol=0, atol=1e-12)


def test_state_from_another_model_is_refused(tmp_path) -> None:
    _, st = tiny("hope")(torch.randint(0, 64, (1, 5)))
    save_state(st, tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        load_state(tmp_path, tiny("hope", mem_chunk=8))
    with pytest.raises(ValueError, match="needs a ModelState"):
        save_state({"not": "a state"}, tmp_path)  # type: ignore[arg-type]
