"""`cuda_graphs=true` in `nestlearn train`: refused with the fix where it cannot run (CPU, DDP / FSDP, together with
compile). Its equality with eager steps is `tests/models/test_graphs.py` (GPU)."""

from __future__ import annotations

import pytest

from nestlearn.train import TrainConfig, train
from nestlearn.train.loop import _check_graphs
from tests.train.helpers import TINY


def test_cuda_graphs_on_cpu_names_the_fix(data, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"cuda_graphs needs a CUDA device.*cuda_graphs=false"):
        train(TrainConfig(data=str(data), out=str(tmp_path), steps=1, cuda_graphs=True, device="cpu", **TINY))


@pytest.mark.parametrize(("mode", "compile", "match"), [("ddp", False, "one GPU"), ("fsdp", False, "one GPU"),
                                                        ("none", True, "compile=true exclude")])  # fmt: skip
def test_cuda_graphs_refuses_what_it_cannot_run_with(data, mode: str, compile: bool, match: str) -> None:
    cfg = TrainConfig(data=str(data), steps=1, cuda_graphs=True, compile=compile, **TINY)
    with pytest.raises(ValueError, match=match):
        _check_graphs(cfg, mode)
