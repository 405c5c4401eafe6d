"""Training stability of the model variants: AdamW steps on one repeated random batch, losses per step.

This is the check behind the inner-gradient clip of the Titans memories (docs/decisions.md): without it the
125M MAG model's loss turns NaN within a few steps on the GPU. Each (variant, setting) runs from the same seed;
the table printed last gives the first and last loss and the first non-finite step (if any).

    python benchmarks/stability.py --preset 125M --seq 4096 --steps 30 --variants titans_mag --clips none,3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nestlearn.models import CausalLM, preset


def run(variant: str, clip: float | None, args: argparse.Namespace) -> dict:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="titans_mag")
    p.add_argument("--clips", default="none,3", help="comma-separated inner_grad_clip values; 'none' = off")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    clips = [None if c == "none" else float(c) for c in args.clips.split(",")]
    rows = [run(v, c, args) for v in args.variants.split(",") for c in clips]
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    print(f"{'variant':<12} {'clip':>6} {'loss@1':>8} {'loss@end':>9} {'steps':>6} {'first NaN':>10}")
    for r in rows:
        print(
            f"{r['variant']:<12} {r['clip']!s:>6} {r['losses'][0]:>8.4f} {r['losses'][-1]:>9.4f} "
            f"{len(r['losses']):>6} {r['first_nonfinite_step'] or '-'!s:>10}"
        )


if __name__ == "__main__":
    main()
