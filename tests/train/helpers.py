"""Settings and readers shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path

SMALL = {"n_layers": 2, "d_model": 32, "n_heads": 2, "mlp_hidden": 48}
TINY = dict(model="debug", variant="transformer", seq_len=16, batch_size=4, warmup=2, log_every=1, eval_every=3,
            eval_windows=2, ckpt_every=3, model_overrides=SMALL)  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple[int, float, float | None]]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in records(out)]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())
