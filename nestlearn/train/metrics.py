"""A run's logs: `metrics.jsonl`, TensorBoard scalars, the progress line and `loss.png`.

What this is: `MetricsLog(out, resume_step)`, written by rank 0 only. On a resume it keeps exactly the records
up to the resumed step (a record of a later step belongs to work the checkpoint does not hold and is logged again)
and drops a cut-off last line (a run killed mid-write); TensorBoard gets `purge_step`, so the events of the
discarded steps disappear from its plots instead of overlapping. The JSONL file is rewritten atomically.
What it is not: checkpoints (`checkpoints.py`) or the training loop (`loop.py`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

SCALARS = ("loss", "val_loss", "grad_norm", "tokens_per_s", "lr_scale", "nonfinite_steps")


class MetricsLog:
    """The records of one run (all of them, earlier pieces of a resumed run included)."""

    def __init__(self, out: Path, resume_step: int, *, enabled: bool = True) -> None:
        self.path, self.enabled, self.resume_step = out / "metrics.jsonl", enabled, resume_step
        self.records: list[dict[str, Any]] = []
        self._tb: Any = None
        if enabled:
            self.records = [r for r in read_records(self.path) if r["step"] <= resume_step]
            _rewrite(self.path, self.records)

    def write(self, record: dict[str, Any], steps: int, eta_s: float) -> None:
        """Append one record, mirror it to TensorBoard and print the progress line."""
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._tensorboard(record)
        loss = "nan" if record["loss"] is None else f"{record['loss']:.4f}"
        val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
        bad = f" ({record['nonfinite_steps']} non-finite skipped)" if record.get("nonfinite_steps") else ""
        print(f"step {record['step']:6d}/{steps} loss {loss}{val} {record['tokens_per_s']:,.0f} tok/s "
              f"ETA {eta_s / 60:.1f} min{bad}", flush=True)  # fmt: skip

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional (the `train` extra)
                self._tb = False
                return
            # purge_step: TensorBoard discards the earlier events of every step after the one resumed from
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self.resume_step + 1)
        if self._tb is False:
            return
        for key in SCALARS:
            if record.get(key) is not None:
                self._tb.add_scalar(key, record[key], record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        self._tb = None

    def plot(self, title: str) -> Path | None:
        """`loss.png` beside the log: training loss (every record) and validation loss; None without matplotlib."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = [(r["step"], r["loss"]) for r in self.records if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in self.records if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        for points, label in ((train, "train"), (val, "validation")):
            if points:  # a marker on every point, so a curve of one point is still visible
                ax.plot(*zip(*points, strict=True), "o-", markersize=3, label=label)
        ax.set(xlabel="step", ylabel="next-token loss", title=title)
        ax.legend()
        fig.tight_layout()
        path = self.path.parent / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a `metrics.jsonl` (a line cut off by a killed run, or any unreadable line, is
    skipped), or [] when the file does not exist."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: a non-finite value is logged as null."""
    return x if math.isfinite(x) else None


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
