"""Shared by the model benchmarks: time AdamW training steps of one config, and describe the run.

One training step = forward over `batch x seq` tokens, next-token loss, backward, AdamW step (lr 1e-4) on one
batch of random token ids repeated every step. On CUDA the step runs under bf16 autocast; peak memory is
`torch.cuda.max_memory_allocated`, on CPU the process's peak resident memory.
"""

from __future__ import annotations

import os
import platform
import resource
import time

import torch

from nestlearn.models import CausalLM, ModelConfig, count_parameters


def time_training(cfg: ModelConfig, *, batch: int, seq: int, device: str, steps: int, warmup: int) -> dict:
    """Median step time, tokens/s, peak memory (GiB) and the last loss of `steps` timed steps after `warmup`."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = CausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    sync(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return {
        "params": count_parameters(cfg),
        "step_s": sec,
        "tokens_per_s": batch * seq / sec,
        "peak_gib": peak,
        "final_loss": float(loss.detach()),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_meta(device: str, **fields: object) -> dict:
    """Machine, versions, commit (`NESTLEARN_COMMIT`) and date of a run, with the caller's settings."""
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("NESTLEARN_COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d"),
        **fields,
    }
