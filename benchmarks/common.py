"""Shared by the model benchmarks: time AdamW training steps of one config, and describe the run.

One training step = forward over `batch x seq` tokens, next-token loss, backward, AdamW step (lr 1e-4) on one
batch of random token ids repeated every step. On CUDA the step runs under bf16 autocast; peak memory is
`torch.cuda.max_memory_allocated` and, beside it, `max_memory_reserved` (what the allocator held, CUDA graphs'
private pools included: their replays allocate nothing, so memory a graph keeps for the model's life shows in the
reserved figure only); on CPU the process's peak resident memory. `graphs=True` replays every block
call of a step as a CUDA graph (`nestlearn.models.graphs.StepGraphs`; captured in the first warm-up step, the
warm-up's seconds reported as `capture_s`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable

import torch

from nestlearn.models import CausalLM, ModelConfig, count_parameters
from nestlearn.models.graphs import StepGraphs
from nestlearn.models.lm import next_token_loss
from nestlearn.train.loop import prepare_compile


def time_training(
    cfg: ModelConfig, *, batch: int, seq: int, device: str, steps: int, warmup: int, graphs: bool = False,
    compile: bool = False,
) -> dict:  # fmt: skip
    """Median step time, tokens/s, peak memory (GiB) and the last loss of `steps` timed steps after `warmup`
    (`graphs` / `compile`: at least one warm-up step, which captures or compiles; `capture_s` is the warm-up's
    time)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = training_step(cfg, batch=batch, seq=seq, device=dev, graphs=graphs, compile=compile)
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1 if graphs or compile else 0)):
        step()
    sync(dev)
    capture_s = time.perf_counter() - t0  # with graphs: the warm-up steps capture every block call
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
    else:
        peak = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return {
        "params": count_parameters(cfg),
        "step_s": sec,
        "tokens_per_s": batch * seq / sec,
        "peak_gib": peak,
        "reserved_gib": reserved,
        "final_loss": float(loss.detach()),
        **({"capture_s": capture_s} if graphs or compile else {}),
    }


def training_step(
    cfg: ModelConfig, *, batch: int, seq: int, device: torch.device, graphs: bool = False, compile: bool = False
) -> Callable[[], torch.Tensor]:
    """A fresh model of `cfg` (seed 0), fused AdamW on CUDA, one batch of random ids, and the step that trains on
    it (bf16 autocast on CUDA; `graphs`: the block calls replayed as CUDA graphs; `compile`: the model under
    `torch.compile`, as `nestlearn train compile=true` runs it) and returns the loss."""
    if graphs and compile:
        raise ValueError("graphs and compile exclude each other (as cuda_graphs and compile do in nestlearn train)")
    torch.manual_seed(0)
    model = CausalLM(cfg).to(device)
    # the settings nestlearn train compiles and runs it under (online CMS levels: buffer donation off), for the
    # step only, so that later rows in the process compile with torch's own; its refusals come here, at set-up
    settings = prepare_compile(model) if compile else contextlib.nullcontext()
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    captured = StepGraphs(model) if graphs else None

    def step() -> torch.Tensor:
        with settings:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                if captured is not None:
                    loss = next_token_loss(captured.logits(ids)[:, :-1], ids[:, 1:])
                else:
                    loss = next_token_loss(forward(ids)[0][:, :-1], ids[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


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
