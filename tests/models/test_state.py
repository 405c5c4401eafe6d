"""Saving and loading the learning state: a deployed model continues exactly where it stopped."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
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


def test_the_file_names_every_tensor_by_its_field(tmp_path) -> None:
    """Typed state: tensors are stored under field names, not positions, and come back as the same types."""
    model = tiny("hope", cms_levels=(None, 4), cms_lr=(0.0, 0.1))
    with torch.no_grad():
        _, st = model(torch.randint(0, 64, (1, 6)))
    save_state(st, tmp_path)
    names = set(safetensors.torch.load_file(tmp_path / "state.safetensors"))
    assert "state.blocks.0.mixers.0.memory.weights.0" in names and "state.blocks.1.cms.levels.1.grads.2" in names
    back = load_state(tmp_path, model)
    assert type(back.blocks[0]) is type(st.blocks[0]) and type(back.blocks[0].cms) is type(st.blocks[0].cms)


def test_a_state_of_the_earlier_positional_format_is_refused_with_the_fix(tmp_path) -> None:
    _, st = tiny("transformer")(torch.randint(0, 64, (1, 5)))
    save_state(st, tmp_path)
    meta = json.loads((tmp_path / "state.json").read_text())
    del meta["state_format"]  # the earlier files have no format key
    (tmp_path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"state format 1 \(an earlier nestlearn\); this version reads format 2"):
        load_state(tmp_path, tiny("transformer"))
