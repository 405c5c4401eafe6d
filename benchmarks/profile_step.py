"""Where one LM training step's time goes: the profiler's view of a preset variant's step, as a short table.

    python -m benchmarks.profile_step --variant hope --preset 20M --batch 8 --seq 2048
    python -m benchmarks.profile_step --variant hope --set cms_online_layers=[] --graphs
    python -m benchmarks.profile_step --device cpu --preset debug --batch 2 --seq 64     # the path, on CPU

The step is `benchmarks.common.time_training`'s (forward, next-token loss, backward, AdamW; bf16 autocast on
CUDA), warmed up (`--warmup` steps: compiles Triton kernels and, with `--graphs`, captures the block calls), then
one step is profiled. Printed: the step's wall time, the device's busy time (the sum of its kernels' times, so
busy / wall near 1 means compute-bound, well under 1 means the host's launches or syncs bound it), the kernel
launch count, and the `--top` kernels (CUDA; CPU ops on CPU) by self time with their share of the busy time.
What this is not: a timing benchmark (the profiler slows the host side; `benchmarks.speed` times steps).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import training_step
from nestlearn.models.presets import PRESETS, preset


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="hope")
    p.add_argument("--preset", default="20M", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="a config override, the value as JSON (e.g. cms_online_layers=[] or mem_chunk=32)")  # fmt: skip
    p.add_argument("--graphs", action="store_true", help="replay the block calls as CUDA graphs (StepGraphs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    """`["a=1", "b=[]"]` -> `{"a": 1, "b": ()}` (JSON values; lists become tuples, as configs hold them)."""
    out = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: write FIELD=JSON, e.g. --set mem_chunk=32")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            hint = "quote strings: --set memory_activation='\"gelu\"'"
            raise SystemExit(f"--set {pair!r}: the value is not JSON ({e}); {hint}") from None
        out[field] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    cfg = preset(args.preset, args.variant, **overrides(args.set))
    step = training_step(cfg, batch=args.batch, seq=args.seq, device=dev, graphs=args.graphs)
    for _ in range(max(args.warmup, 1)):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return report(prof, wall, args, cuda)


def report(prof: profile, wall: float, args: argparse.Namespace, cuda: bool) -> dict:
    """Print the step's summary and top kernels; return them."""
    kernels = [e for e in prof.events() if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / 1e6 if cuda else None
    stats = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(stats, key=lambda e: getattr(e, key), reverse=True)[: args.top]
    total = sum(getattr(e, key) for e in stats) or 1.0
    head = f"{args.variant} {args.preset} {args.batch} x {args.seq}" + (" + CUDA graphs" if args.graphs else "")
    print(f"# {head}: step {wall:.3f} s wall", end="")
    if cuda:
        print(f", device busy {busy:.3f} s ({busy / wall:.0%} of wall), {len(kernels):,} kernel launches")
    else:
        print()
    print("| op / kernel | calls | self time (ms) | share |")
    print("|---|---|---|---|")
    top = []
    for e in rows:
        t = getattr(e, key)
        top.append({"name": e.key, "calls": e.count, "self_ms": t / 1e3, "share": t / total})
        print(f"| {e.key[:90]} | {e.count:,} | {t / 1e3:,.1f} | {t / total:.1%} |")
    return {"step_s": wall, "busy_s": busy, "launches": len(kernels) if cuda else None, "top": top}


if __name__ == "__main__":
    main()
