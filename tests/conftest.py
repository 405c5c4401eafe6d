"""Test harness: fixed seeds, NaN-filled `torch.empty*` (so unwritten memory shows up), GPU markers, and Triton's
interpreter on machines without CUDA (set before any kernel is compiled, so the fused kernels' tests run on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_EMPTY, _EMPTY_LIKE = torch.empty, torch.empty_like


def _nan_filled(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


def _poisoned_empty(*args, **kwargs) -> torch.Tensor:
    # the wrapper is not the function a `with torch.device(...)` context intercepts, so pass its device on
    if kwargs.get("device") is None:
        kwargs["device"] = torch.get_default_device()
    return _nan_filled(_EMPTY(*args, **kwargs))


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _nan_filled(_EMPTY_LIKE(*a, **kw)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
