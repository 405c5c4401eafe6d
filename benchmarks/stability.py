"""Training stability of the model variants: does AdamW training stay finite, and how fast does it run?

Three modes; each prints a short table last and writes everything (per-step losses included) with `--json`.

`clip` (default; the check behind the Titans memories' inner-gradient clip, docs/decisions.md): AdamW (lr 1e-4)
on one repeated random batch, per `inner_grad_clip` value; the table gives the first and last loss and the first
non-finite step.

    python -m benchmarks.stability --preset 125M --seq 4096 --steps 25 --variants titans_mag --clips none,3

`sweep`: tiny models of each variant (by default the diverging tiny setting of docs/results/stability.md:
2 blocks, width 64, 4 heads, the debug preset's MLP width, a 4-token vocabulary) trained on fresh batches of a
synthetic bit task with AdamW (gradient clip 1) at every learning rate of `--lrs`, in every dtype of `--dtypes`
(bf16 = autocast, fp32 = none).

    python -m benchmarks.stability --mode sweep --variants hope --steps 100 --max-minutes 7 --json sweep_hope.json

`--old-chain` turns the CMS level norm off (HOPE, Hope-Attention), recreating the tiny-HOPE divergence
(docs/decisions.md):

    python -m benchmarks.stability --mode sweep --variants hope --task copy --lrs 1e-2 --dtypes fp32 --steps 200 \\
        --old-chain --max-minutes 4

`train`: one or more variants at a preset (default 20M), bf16 autocast, on a synthetic copy task (or the train
split of a prepared dataset, `--data DIR`), counting the steps whose loss or gradient norm is not finite (their
update is skipped) and those whose gradient norm is exactly 0, and reporting tokens/s (steps after the first
`--warmup`, wall clock including the per-step check of the loss and gradient norm).

    python -m benchmarks.stability --mode train --preset 20M --variants hope --batch 4 --seq 256 --steps 2000 \\
        --max-minutes 7 --json train_hope.json

`--max-minutes` bounds the whole call: runs go in order and each may use its share of the time left
(time left / runs left); a run that reaches its share stops and reports the steps it completed, so one call
always ends near the budget with a row for every run; `--json` is rewritten after every run. Each step
synchronises once (the loss and the gradient norm are read to decide whether to apply the update). Set
`NESTLEARN_COMMIT` to record the commit in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import run_meta, sync
from nestlearn.models import CausalLM, preset
from nestlearn.models.config import VARIANTS, fields_for

# the tiny model that diverges without the level norm:
# 2 blocks of width 64 (4 heads of 16), the debug preset's MLP width, 4 tokens
TINY = dict(vocab_size=4, n_layers=2, d_model=64, n_heads=4)


# ---------------------------------------------------------------------------------------------
# tasks


def batch_of(task: str, batch: int, seq: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Synthetic token ids `[batch, seq]` (CPU):
    xor: bits interleaved with their running xor (`b1 x1 b2 x2 ...`); copy: random tokens (bits when the
    vocabulary is 4) then a separator and the same tokens again; random: uniform tokens."""
    if task == "xor":
        b = torch.randint(0, 2, (batch, (seq + 1) // 2), generator=gen)
        return torch.stack([b, b.cumsum(1) % 2], dim=-1).reshape(batch, -1)[:, :seq]
    if task == "copy":
        hi = 2 if vocab <= 4 else vocab - 1
        half = (seq - 1) // 2
        x = torch.randint(0, hi, (batch, half), generator=gen)
        sep = torch.full((batch, 1), hi)
        out = torch.cat([x, sep, x], dim=1)
        return torch.cat([out, torch.full((batch, seq - out.shape[1]), hi)], dim=1)
    if task == "random":
        return torch.randint(0, vocab, (batch, seq), generator=gen)
    raise ValueError(f"unknown task {task!r}; choose xor, copy or random")


class Batches:
    """Fresh batches per step: synthetic (`task`) or windows of a prepared dataset's train split (`data`)."""

    def __init__(self, args: argparse.Namespace, vocab: int, device: torch.device) -> None:
        self.args, self.vocab, self.device = args, vocab, device
        self.gen = torch.Generator().manual_seed(args.seed + 1)
        self.shards = None
        if args.data:
            from nestlearn.data.shards import Shards

            self.shards = Shards(args.data)

    def __call__(self, step: int) -> torch.Tensor:
        a = self.args
        if self.shards is not None:
            ids = self.shards.batch("train", step, a.batch, a.seq - 1, a.seed)
        else:
            ids = batch_of(a.task, a.batch, a.seq, self.vocab, self.gen)
        return ids.to(self.device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# one training run


def train_run(model: CausalLM, args: argparse.Namespace, *, lr: float, bf16: bool, budget_s: float) -> dict:
    """AdamW with the gradient clipped to `args.grad_clip` on fresh batches until `args.steps` or `budget_s`.
    A step whose loss or gradient norm is not finite is counted and its update skipped."""
    device = model.device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    batches = Batches(args, model.config.vocab_size, device)
    losses, norms, nonfinite, zero = [], [], [], 0
    start = time.perf_counter()
    timed_from, timed_steps = None, 0
    for step in range(args.steps):
        if step == args.warmup:
            sync(device)
            timed_from = time.perf_counter()
        ids = batches(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(ids)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lv, nv = (float(x) for x in torch.stack([loss.detach().float(), norm.float()]).tolist())  # one sync
        losses.append(lv)
        norms.append(nv)
        if math.isfinite(lv) and math.isfinite(nv):
            zero += nv == 0
            opt.step()
        else:
            nonfinite.append(step + 1)
        opt.zero_grad(set_to_none=True)
        if timed_from is not None:
            timed_steps += 1
        if args.log_every and (step + 1) % args.log_every == 0:
            took = time.perf_counter() - start
            print(f"    step {step + 1}: loss {lv:.4f} grad norm {nv:.3g} ({took:.0f} s)", flush=True)
        if time.perf_counter() - start > budget_s:
            break
    sync(device)
    elapsed = time.perf_counter() - start
    timed = time.perf_counter() - timed_from if timed_from is not None else float("nan")
    finite = [x for x in losses if math.isfinite(x)]
    k = max(1, min(10, len(finite) // 4))
    return dict(
        lr=lr, dtype="bf16" if bf16 else "fp32", steps_done=len(losses), steps_asked=args.steps,
        stopped_by_budget=len(losses) < args.steps, nonfinite_steps=len(nonfinite), first_nonfinite=nonfinite[:1],
        zero_grad_steps=zero, loss_first=sum(finite[:k]) / k if finite else float("nan"),
        loss_last=sum(finite[-k:]) / k if finite else float("nan"), max_grad_norm=max(norms) if norms else 0.0,
        seconds=elapsed, tokens_per_s=timed_steps * args.batch * args.seq / timed if timed_steps else float("nan"),
        losses=losses, grad_norms=norms,
    )  # fmt: skip


def healthy(row: dict) -> bool:
    return row["nonfinite_steps"] == 0 and row["zero_grad_steps"] == 0


# ---------------------------------------------------------------------------------------------
# modes


def plan(args: argparse.Namespace) -> list[dict]:
    variants = VARIANTS if args.variants == "all" else tuple(args.variants.split(","))
    if args.mode == "sweep":
        lrs = [float(x) for x in args.lrs.split(",")]
        dtypes = args.dtypes.split(",")
        return [dict(variant=v, lr=lr, dtype=d) for v in variants for d in dtypes for lr in lrs]
    return [dict(variant=v, lr=args.lr, dtype=args.dtype) for v in variants]


def build(variant: str, args: argparse.Namespace, device: torch.device) -> CausalLM:
    torch.manual_seed(args.seed)
    overrides = json.loads(args.overrides) if args.overrides else {}
    if args.mode == "sweep" and args.preset == "debug":
        overrides = {**TINY, **overrides}
    dropped = sorted(set(overrides) - set(fields_for(variant, overrides)))
    if dropped:  # one set of overrides for every variant: each takes the fields that apply to it
        print(f"{variant}: {', '.join(dropped)} do not apply to it", flush=True)
        overrides = fields_for(variant, overrides)
    if args.data:
        from nestlearn.data.shards import Shards

        overrides["vocab_size"] = Shards(args.data).meta["tokenizer"]["vocab_size"]
    if args.old_chain and variant in ("hope", "hope_attention"):  # the un-normalised chain (its divergence)
        overrides["cms_level_norm"] = False
    return CausalLM(preset(args.preset, variant, **overrides)).to(device)


def run_plan(args: argparse.Namespace, save: Callable[[list[dict]], None]) -> list[dict]:
    """Every planned run in order; `save(rows)` after each, so a call killed by its time limit keeps its rows."""
    device = torch.device(args.device)
    runs, rows = plan(args), []
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes else math.inf
    for i, r in enumerate(runs):
        share = (deadline - time.perf_counter()) / (len(runs) - i)
        print(f"[{i + 1}/{len(runs)}] {r['variant']} lr {r['lr']:g} {r['dtype']} (up to {share:.0f} s)", flush=True)
        model = None
        try:
            model = build(r["variant"], args, device)
            row = train_run(model, args, lr=r["lr"], bf16=r["dtype"] == "bf16", budget_s=share)
            row = dict(variant=r["variant"], params=sum(p.numel() for p in model.parameters()), **row)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # recorded, so one failing run does not hide the rest
            row = dict(r, error=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        save(rows)
        print("   ", {k: v for k, v in row.items() if k not in ("losses", "grad_norms")}, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'variant':<15} {'lr':>7} {'dtype':>5} {'steps':>11} {'non-finite':>10} {'zero grad':>9} "
        f"{'loss first':>10} {'loss last':>9} {'max |g|':>8} {'tokens/s':>9}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<15} {r['lr']:>7g} {r['dtype']:>5} {r['error']}")
            continue
        steps = f"{r['steps_done']}/{r['steps_asked']}"
        first = f" (#{r['first_nonfinite'][0]})" if r["first_nonfinite"] else ""
        print(
            f"{r['variant']:<15} {r['lr']:>7g} {r['dtype']:>5} {steps:>11} {str(r['nonfinite_steps']) + first:>10} "
            f"{r['zero_grad_steps']:>9} {r['loss_first']:>10.4f} {r['loss_last']:>9.4f} {r['max_grad_norm']:>8.3g} "
            f"{r['tokens_per_s']:>9.0f}"
        )


# ---------------------------------------------------------------------------------------------
# the original clip comparison


def run_clip(variant: str, clip: float | None, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CausalLM(preset(args.preset, variant, inner_grad_clip=clip)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    losses = []
    for _ in range(args.steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # a host sync per step is fine here: we want every loss
        if not math.isfinite(losses[-1]):
            break
    bad = next((i + 1 for i, x in enumerate(losses) if not math.isfinite(x)), None)
    return dict(variant=variant, clip=clip, losses=losses, first_nonfinite_step=bad)


def clip_mode(args: argparse.Namespace) -> list[dict]:
    clips = [None if c == "none" else float(c) for c in args.clips.split(",")]
    variants = VARIANTS if args.variants == "all" else args.variants.split(",")
    rows = [run_clip(v, c, args) for v in variants for c in clips]
    print(f"{'variant':<12} {'clip':>6} {'loss@1':>8} {'loss@end':>9} {'steps':>6} {'first NaN':>10}")
    for r in rows:
        print(
            f"{r['variant']:<12} {r['clip']!s:>6} {r['losses'][0]:>8.4f} {r['losses'][-1]:>9.4f} "
            f"{len(r['losses']):>6} {r['first_nonfinite_step'] or '-'!s:>10}"
        )
    return rows


DEFAULTS = {  # per mode: preset, batch, seq, steps, lr, task
    "clip": dict(preset="debug", batch=1, seq=256, steps=10, lr=1e-4, task="random", variants="titans_mag"),
    "sweep": dict(preset="debug", batch=64, seq=64, steps=100, lr=None, task="xor", variants="all"),
    "train": dict(preset="20M", batch=4, seq=256, steps=2000, lr=1e-3, task="copy", variants="hope"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=tuple(DEFAULTS), default="clip")
    p.add_argument("--preset", default=None, help="model size (clip, sweep: debug; train: 20M)")
    p.add_argument("--variants", default=None, help="comma-separated, or 'all'")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="clip, train")
    p.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="sweep")
    p.add_argument("--dtypes", default="bf16,fp32", help="sweep: bf16 (autocast) and/or fp32")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="train")
    p.add_argument("--task", default=None, choices=("xor", "copy", "random"), help="synthetic task (sweep, train)")
    p.add_argument("--data", default=None, help="a prepared dataset directory (train split) instead of a task")
    p.add_argument("--overrides", default=None, help="model overrides as JSON, e.g. '{\"mem_chunk\": 32}'")
    p.add_argument("--old-chain", action="store_true", help="CMS chain without the level norm (it diverges)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3, help="steps not timed for tokens/s")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the whole call")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clips", default="none,3", help="clip: inner_grad_clip values; 'none' = off")
    p.add_argument("--json", default=None)
    p.set_defaults(**DEFAULTS[p.parse_known_args()[0].mode])  # the mode's own defaults, then the real parse
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    meta = run_meta(args.device, **{k: v for k, v in vars(args).items() if k != "device"})

    def save(rows: list[dict]) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(dict(meta=meta, args=vars(args), rows=rows), indent=1))

    rows = clip_mode(args) if args.mode == "clip" else run_plan(args, save)
    save(rows)
    if args.mode != "clip":
        print(f"\n{args.mode}: preset {args.preset}, {args.batch} x {args.seq} tokens, {meta['device']}")
        print_table(rows)


if __name__ == "__main__":
    main()
