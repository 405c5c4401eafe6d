"""Settings and readers shared by the training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from nestlearn.train import load_config, train

SMALL = {"n_layers": 2, "d_model": 32, "n_heads": 2, "mlp_hidden": 48}
TINY = dict(model="debug", variant="transformer", seq_len=16, batch_size=4, warmup=2, log_every=1, eval_every=3,
            eval_windows=2, ckpt_every=3, model_overrides=SMALL)  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple[int, float, float | None]]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in records(out)]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def torchrun(nproc: int, args: list[str]) -> None:
    """`torchrun --standalone --nproc_per_node=nproc -m nestlearn.train *args` on CPU (gloo), one thread a rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nestlearn.train", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def one_process(args: list[str]) -> None:
    """`python -m nestlearn.train *args` in this process on one thread: the run `torchrun(1, args)` makes, the same
    losses and weights bit for bit on CPU (its rank also runs one thread and takes the whole batch), without
    starting torchrun's two interpreters (about 4 s of a 2-core machine's time each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, args))
    finally:
        torch.set_num_threads(threads)
