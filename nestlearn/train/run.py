"""What one process of a training run holds (`Run`), and the signal handler that stops it safely (`Stop`).

What this is: the two objects the loop (`loop.py`) and the checkpoints (`checkpoints.py`) share. What it is not:
either of those.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.shards import Shards
from ..models import CausalLM
from ..models.graphs import StepGraphs
from .config import TrainConfig
from .metrics import MetricsLog


class Stop:
    """SIGINT / SIGTERM set `requested` (the loop stops after the current step); a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after the current step and writing a checkpoint "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)  # fmt: skip


@dataclass
class Run:
    """What one process of a run holds."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    mode: str
    shards: Shards
    model: torch.nn.Module
    core: CausalLM
    opt: Any
    out: Path
    stop: Stop
    log: MetricsLog
    base_lrs: list[float] = field(default_factory=list)  # the schedule scales these
    graphs: StepGraphs | None = None  # cuda_graphs=true: the training steps' block calls as CUDA graphs
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
