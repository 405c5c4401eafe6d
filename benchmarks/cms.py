"""The cost of online CMS learning: training-step throughput and memory of Hope-Attention with a plain SwiGLU,
a static CMS, and online CMS levels (all blocks or the last quarter; first-order or full meta-gradients), at one
preset, Transformer++ in the same process.

All rows have the same parameter count (the preset solves the MLP width: with three levels each is a third as
wide). The CMS levels are the default (static, 2048, 512), so at 4,096 tokens an online model runs 8 segments
of 512 tokens, each with its own backward pass for the inner gradient, and updates its 512-level 8 times and its
2048-level twice. The last table column is the last timed step's loss: a NaN check, not a quality measure.

    python -m benchmarks.cms --preset 125M --seq 4096 --device cuda --json docs/results/cms_h100_125M.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import run_meta, time_training
from nestlearn.models import preset


def settings(name: str) -> dict[str, dict]:
    """Row label -> (variant, overrides) at a preset."""
    n = preset(name).n_layers
    last_quarter = tuple(range(n - n // 4, n))
    return {
        "transformer": dict(variant="transformer"),
        "swiglu (w/o CMS)": dict(variant="hope_attention", cms=False),
        "static CMS": dict(variant="hope_attention", cms_online_layers=()),
        "online CMS, last quarter": dict(variant="hope_attention", cms_online_layers=last_quarter),
        "online CMS, all blocks": dict(variant="hope_attention"),
        "online CMS, last quarter, full": dict(
            variant="hope_attention", cms_online_layers=last_quarter, cms_meta_grad="full"
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="20M")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for label, s in settings(args.preset).items():
        cfg = preset(args.preset, **s)
        try:
            stats = time_training(
                cfg, batch=args.batch, seq=args.seq, device=args.device, steps=args.steps, warmup=args.warmup
            )
        except torch.OutOfMemoryError:
            stats = {"error": "out of memory"}
            torch.cuda.empty_cache()
        rows.append({"setting": label, "mlp_hidden": cfg.mlp_hidden, **stats})
        print(json.dumps(rows[-1]), flush=True)
    meta = run_meta(args.device, preset=args.preset, seq=args.seq, batch=args.batch, steps=args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    ref = rows[0]
    print(f"\n{meta['device']}, preset {args.preset}, batch {args.batch} x seq {args.seq}, torch {meta['torch']}")
    print(f"{'setting':32s} {'params':>8s} {'step s':>8s} {'tok/s':>9s} {'vs T++':>7s} {'peak GiB':>9s} {'loss':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['setting']:32s} {r['error']}")
            continue
        ratio = r["tokens_per_s"] / ref["tokens_per_s"]
        print(
            f"{r['setting']:32s} {r['params'] / 1e6:7.1f}M {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} "
            f"{ratio:7.3f} {r['peak_gib']:9.2f} {r['final_loss']:7.3f}"
        )


if __name__ == "__main__":
    main()
