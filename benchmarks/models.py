"""Training-step throughput and peak memory of every model variant at one preset, Transformer++ in the same run.

One training step = forward over `batch x seq` tokens, next-token loss, backward, AdamW step. On CUDA the step
runs under bf16 autocast (fast weights stay float32, D8); peak memory is `torch.cuda.max_memory_allocated`.
On CPU each variant runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
The last thing printed is a table with tokens/s relative to Transformer++.

    python -m benchmarks.models --preset 20M --seq 512 --device cpu
    python -m benchmarks.models --preset 125M --seq 4096 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import run_meta, time_training
from nestlearn.models import VARIANTS, count_parameters, preset


def one_variant(variant: str, args: argparse.Namespace) -> dict:
    cfg = preset(args.preset, variant, activation_checkpointing=args.checkpoint)
    stats = time_training(cfg, batch=args.batch, seq=args.seq, device=args.device, steps=args.steps, warmup=args.warmup)
    return {"variant": variant, **stats}


def _guarded(variant: str, args: argparse.Namespace) -> dict:
    """One CUDA variant; an out-of-memory or runtime error is recorded instead of ending the run."""
    try:
        return one_variant(variant, args)
    except torch.OutOfMemoryError:
        error = "out of memory"
    except RuntimeError as e:  # recorded, so one failing variant does not hide the others
        error = f"RuntimeError: {str(e).splitlines()[0][:80]}"
    torch.cuda.empty_cache()
    return {"variant": variant, "error": error, "params": count_parameters(preset(args.preset, variant))}


def run_isolated(variant: str, args: argparse.Namespace) -> dict:
    """One variant in a fresh process (its own peak RSS), with this run's settings."""
    flags = ["--preset", args.preset, "--seq", str(args.seq), "--batch", str(args.batch), "--device", args.device]
    flags += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--variants", variant, "--child"]
    flags += ["--checkpoint"] if args.checkpoint else []
    cmd = [sys.executable, "-m", "benchmarks.models", *flags]  # run from the repository root, as this one is
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="20M")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    variants = args.variants.split(",")
    if args.child:
        print(json.dumps(one_variant(variants[0], args)))
        return
    if "transformer" not in variants:
        variants.append("transformer")
    rows = []
    for v in variants:
        row = run_isolated(v, args) if args.device == "cpu" else _guarded(v, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = next(r for r in rows if r["variant"] == "transformer")
    meta = run_meta(
        args.device, preset=args.preset, seq=args.seq, batch=args.batch, steps=args.steps, checkpoint=args.checkpoint
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    ckpt = ", activation checkpointing" if args.checkpoint else ""
    print(f"\n{meta['device']}, preset {args.preset}, batch {args.batch} x seq {args.seq}{ckpt}, torch {meta['torch']}")
    print(f"{'variant':16s} {'params':>9s} {'step s':>8s} {'tok/s':>9s} {'vs T++':>7s} {'peak GiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:16s} {r['params'] / 1e6:8.1f}M {r['error']}")
            continue
        ratio = r["tokens_per_s"] / ref["tokens_per_s"]
        print(
            f"{r['variant']:16s} {r['params'] / 1e6:8.1f}M {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} "
            f"{ratio:7.3f} {r['peak_gib']:9.2f}"
        )


if __name__ == "__main__":
    main()
