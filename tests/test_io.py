"""Atomic safetensors + JSON bundles: round trip, corruption and mixing detected, no half-written file on failure."""

from __future__ import annotations

import json

import pytest
import torch

import nestlearn.io as nio


def test_round_trip(tmp_path) -> None:
    t = {"a": torch.randn(3, 4), "b": torch.arange(5).expand(2, 5)}  # an expanded (non-contiguous) view too
    nio.save_bundle(tmp_path, "x", t, {"step": 7})
    got, meta = nio.load_bundle(tmp_path, "x")
    assert meta["step"] == 7 and meta["format_version"] == nio.FORMAT_VERSION
    for k in t:
        torch.testing.assert_close(got[k], t[k])


def test_corruption_and_mixing_are_detected(tmp_path) -> None:
    nio.save_bundle(tmp_path / "one", "x", {"a": torch.zeros(4)}, {})
    nio.save_bundle(tmp_path / "two", "x", {"a": torch.ones(4)}, {})
    (tmp_path / "one" / "x.json").replace(tmp_path / "two" / "x.json")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        nio.load_bundle(tmp_path / "two", "x")
    path = tmp_path / "two" / "x.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="corrupted, truncated"):
        nio.load_bundle(tmp_path / "two", "x")
    (tmp_path / "two" / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        nio.load_bundle(tmp_path / "two", "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nio.load_bundle(tmp_path / "missing", "x")


def test_failed_save_leaves_the_previous_bundle(tmp_path, monkeypatch) -> None:
    """A crash (here: a full disk) while writing keeps the old files intact and leaves no temporary behind."""
    nio.save_bundle(tmp_path, "x", {"a": torch.zeros(4)}, {"v": 1})

    def disk_full(tensors, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nio, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        nio.save_bundle(tmp_path, "x", {"a": torch.ones(4)}, {"v": 2})
    got, meta = nio.load_bundle(tmp_path, "x")
    assert meta["v"] == 1 and float(got["a"].sum()) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.safetensors"]
    assert json.loads((tmp_path / "x.json").read_text())["v"] == 1
