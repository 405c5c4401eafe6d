"""Check `nestlearn train` on GPUs: bf16 autocast, NCCL, DDP (with accumulation) and FSDP2 (stopped and resumed
from its gathered checkpoint), online CMS levels under DDP, and `torch.compile`, each against one process with
the same global batch. Prints a table and writes the measured record as JSON.

What this is: the GPU half of the training loop's distributed tests (tests/train/test_pipeline.py runs the
same comparisons on CPU with gloo, where they are exact). What it is not: a speed benchmark; the tokens/s column
is the loop's own progress figure, recorded so that a regression is visible, not a tuned number.

Usage, from the repository root (2 GPUs for the 2-rank rows; with 1 GPU those rows are skipped and said so):
  python -m scripts.train_gpu_check --data .cache/gpu_data --out /tmp/gpu_check --json train_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# bf16 autocast rounds every matmul input to 8 mantissa bits; splitting a batch over ranks (or compiling) changes
# the kernels' shapes and reduction orders, so losses drift apart; fp32 keeps only the reduction-order
# differences. On 2 x H100 (2026-11-26) the worst differences over 60 steps were 8.7e-4 (bf16) and 4.8e-7 (fp32);
# the tolerances leave ~10x room above them.
TOLERANCE = {"bf16": 1e-2, "fp32": 1e-5}


@dataclass
class Case:
    """One run: `nproc` processes (0 = plain `python -m`), its arguments, and the run it must match."""

    name: str
    group: str
    nproc: int
    args: list[str]
    baseline: str | None = None
    stop_at: int | None = None  # stop there, then start again: the second start resumes from the checkpoint
    result: dict = field(default_factory=dict)


def cases(data: str) -> list[Case]:
    lm = [f"data={data}", "model=20M", "variant=transformer", "seq_len=512", "batch_size=16", "steps=60",
          "warmup=10", "log_every=5", "eval_every=20", "eval_windows=16", "ckpt_every=30"]  # fmt: skip
    fp32 = [*lm, "precision=fp32"]
    hope = [f"data={data}", "model=debug", "variant=hope_attention", "seq_len=512", "batch_size=8", "steps=20",
            "warmup=5", "log_every=5", "eval_every=10", "eval_windows=8", "ckpt_every=10",
            "model_overrides.cms_levels=[null,64,256]", "model_overrides.cms_lr=[0.0,0.01,0.01]"]  # fmt: skip
    return [
        Case("1 process", "transformer 20M bf16", 0, lm),
        Case("torch.compile", "transformer 20M bf16", 0, [*lm, "compile=true"], "1 process"),
        Case("FSDP2 x1, stop 30 + resume", "transformer 20M bf16", 1, [*lm, "distributed=fsdp"], "1 process", 30),
        Case("DDP x2", "transformer 20M bf16", 2, [*lm, "distributed=ddp"], "1 process"),
        Case("DDP x2, grad_accum 2", "transformer 20M bf16", 2, [*lm, "distributed=ddp", "grad_accum=2"], "1 process"),
        Case("FSDP2 x2, stop 30 + resume", "transformer 20M bf16", 2, [*lm, "distributed=fsdp"], "1 process", 30),
        Case("1 process fp32", "transformer 20M fp32", 0, fp32),
        Case("DDP x2 fp32", "transformer 20M fp32", 2, [*fp32, "distributed=ddp"], "1 process fp32"),
        Case(
            "FSDP2 x2 fp32, stop 30 + resume",
            "transformer 20M fp32",
            2,
            [*fp32, "distributed=fsdp"],
            "1 process fp32",
            30,
        ),
        Case("1 process HOPE-attn", "hope_attention debug, online CMS, bf16", 0, hope),
        Case(
            "DDP x2 HOPE-attn",
            "hope_attention debug, online CMS, bf16",
            2,
            [*hope, "distributed=ddp"],
            "1 process HOPE-attn",
        ),
    ]


def launch(case: Case, out: Path, extra: list[str]) -> float:
    """Run the case once; returns its wall time in seconds (raises with the log's tail when it fails)."""
    if case.nproc == 0:
        cmd = [sys.executable, "-m", "nestlearn.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.nproc}",
               "-m", "nestlearn.train"]  # fmt: skip
    # the children inherit the working directory (the repository root), which `python -m` puts on their path
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    start = time.perf_counter()
    done = subprocess.run([*cmd, *case.args, f"out={out}", *extra], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def run_case(case: Case, root: Path) -> None:
    out = root / case.name.replace(" ", "_").replace(",", "").replace("+", "and")
    wall = 0.0
    if case.stop_at is not None:
        wall += launch(case, out, [f"stop_at={case.stop_at}"])
        resumed = (out / "checkpoints" / f"step_{case.stop_at:07d}").is_dir()
        if not resumed:
            raise RuntimeError(f"{case.name}: no checkpoint at step {case.stop_at} to resume from")
    wall += launch(case, out, [])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    if len(set(steps)) != len(steps):
        raise RuntimeError(f"{case.name}: steps logged twice {steps} (the resume repeated work)")
    case.result = {
        "steps": steps,
        "loss": [r["loss"] for r in rows],
        "val": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]) if len(rows) > 1 else None,
        "wall_s": wall,
    }


def compare(case: Case, base: Case) -> dict:
    a, b = case.result, base.result
    if a["steps"] != b["steps"]:
        raise RuntimeError(f"{case.name}: logged steps {a['steps']} differ from {base.name}'s {b['steps']}")
    train = max(abs(x - y) for x, y in zip(a["loss"], b["loss"], strict=True))
    val = max(abs(a["val"][s] - b["val"][s]) for s in b["val"])
    tol = TOLERANCE["fp32" if "fp32" in case.group else "bf16"]
    return {"max_dloss": train, "max_dval": val, "tolerance": tol, "ok": max(train, val) <= tol}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a directory made by `nestlearn data prepare`")
    ap.add_argument("--out", default="/tmp/nestlearn_gpu_check")
    ap.add_argument("--json", default=None, help="write the record here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "this check needs a CUDA GPU; the CPU versions of these comparisons are in tests/train/test_pipeline.py"
        )
    gpus = torch.cuda.device_count()
    root = Path(args.out)
    record = {"machine": f"{gpus} x {torch.cuda.get_device_name(0)}", "torch": torch.__version__,
              "commit": os.environ.get("NESTLEARN_COMMIT", "unknown"), "date": time.strftime("%Y-%m-%d"),
              "rows": []}  # fmt: skip
    by_name: dict[str, Case] = {}
    for case in cases(args.data):
        row = {"group": case.group, "run": case.name}
        if case.nproc > gpus:
            row["skipped"] = f"needs {case.nproc} GPUs, {gpus} here"
        else:
            run_case(case, root)
            by_name[case.name] = case
            res = case.result
            row |= {"final_loss": res["loss"][-1], "final_val": res["val"][max(res["val"])],
                    "tokens_per_s": res["tokens_per_s"], "wall_s": res["wall_s"]}  # fmt: skip
            if case.baseline:
                row |= compare(case, by_name[case.baseline])
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{record['machine']}, torch {record['torch']}, commit {record['commit']}")
    print(f"{'run':<34} {'final loss':>10} {'final val':>9} {'max|dloss|':>10} {'max|dval|':>9} {'tol':>6} "
          f"{'tok/s':>9} {'wall s':>7}")  # fmt: skip
    group = None
    for r in record["rows"]:
        if r["group"] != group:
            group = r["group"]
            print(f"-- {group}")
        if "skipped" in r:
            print(f"{r['run']:<34} skipped: {r['skipped']}")
            continue
        cmp = (f"{r['max_dloss']:>10.2e} {r['max_dval']:>9.2e} {r['tolerance']:>6.0e}" if "ok" in r
               else f"{'baseline':>10} {'':>9} {'':>6}")  # fmt: skip
        flag = "" if r.get("ok", True) else "  FAIL"
        print(f"{r['run']:<34} {r['final_loss']:>10.4f} {r['final_val']:>9.4f} {cmp} {r['tokens_per_s']:>9,.0f} "
              f"{r['wall_s']:>7.1f}{flag}")  # fmt: skip
    if not all(r.get("ok", True) for r in record["rows"]):
        sys.exit("some runs do not match their baseline within tolerance")


if __name__ == "__main__":
    main()
