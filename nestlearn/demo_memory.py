"""A memory that learns key -> value pairs from its context, then recalls them (the memory-op demo).

What this is: the memory op on an embedded default. Each sequence shows
`pairs` random (key, value) associations a few times in shuffled order; the memory op writes them into its
fast weights (per sequence, per head), and afterwards is read at every key with no further writing. The
recall cosine against the true value is compared with the initial state's, for three memories and both
implementations (`naive` per-token reference, `chunk` parallel form), which must agree.
What it is not: a trained model. The gates are fixed numbers here; in the models they are learned.

    python -m nestlearn.demo_memory [--pairs 24] [--dim 32] [--repeats 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .ops.memory import MemorySpec, MemoryState, init_state, memory_chunk, memory_naive

MEMORIES = {
    "linear, dot objective, DGD (= delta rule)": (MemorySpec(kind="linear", objective="dot", momentum=False), 1.0),
    "linear, L2, plain GD + momentum (Titans)": (MemorySpec(kind="linear", dgd=False), 0.5),
    "MLP x + W1 σ(W2 x), L2, DGD + momentum (HOPE)": (MemorySpec(kind="mlp"), 0.2),
}


def associations(batch: int, heads: int, pairs: int, dim: int, repeats: int, seed: int) -> dict[str, torch.Tensor]:
    """Keys on the unit sphere, random unit values, every pair shown `repeats` times in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(batch, pairs, heads, dim, generator=g), dim=-1)
    values = F.normalize(torch.randn(batch, pairs, heads, dim, generator=g), dim=-1)
    order = torch.cat([torch.randperm(pairs, generator=g) for _ in range(repeats)])
    return {"keys": keys, "values": values, "k": keys[:, order], "v": values[:, order]}


def recall(spec: MemorySpec, state: MemoryState, keys: torch.Tensor, values: torch.Tensor) -> float:
    """Mean cosine between `M(key)` and its value, reading without writing (eta = 0)."""
    B, P, H, _ = keys.shape
    zeros = torch.zeros(B, P, H)
    gates = {"alpha": torch.ones_like(zeros) if spec.decay else None, "beta": zeros if spec.momentum else None}
    out, _ = memory_chunk(keys, keys, values, zeros, **gates, state=state, spec=spec, chunk_size=P)
    if spec.kind == "mlp":
        out = out - keys  # the residual path carries no memory
    return F.cosine_similarity(out, values, dim=-1).mean().item()


def run_one(spec: MemorySpec, eta: float, data: dict[str, torch.Tensor], chunk: int) -> dict[str, float]:
    k, v = data["k"], data["v"]
    B, T, H, D = k.shape
    gate = torch.full((B, T, H), eta)
    gates = {
        "alpha": torch.full((B, T, H), 0.999) if spec.decay else None,
        "beta": torch.full((B, T, H), 0.5) if spec.momentum else None,
    }
    state = init_state(spec, B, H, D, std=0.0 if spec.kind == "linear" else 0.02)
    times, results = {}, {}
    for name, fn in (("naive", memory_naive), ("chunk", memory_chunk)):
        t0 = time.perf_counter()
        results[name] = fn(k, k, v, gate, **gates, state=state, spec=spec, chunk_size=chunk)
        times[name] = time.perf_counter() - t0
    (o_naive, st_naive), (o_chunk, st_chunk) = results["naive"], results["chunk"]
    diff = max((a - b).abs().max().item() for a, b in zip(st_naive.weights, st_chunk.weights, strict=True))
    return {
        "before": recall(spec, state, data["keys"], data["values"]),
        "after": recall(spec, st_chunk, data["keys"], data["values"]),
        "max|naive-chunk|": max(diff, (o_naive - o_chunk).abs().max().item()),
        "speedup": times["naive"] / times["chunk"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    data = associations(args.batch, args.heads, args.pairs, args.dim, args.repeats, args.seed)
    T = args.pairs * args.repeats
    print(
        f"in-context associative recall: {args.batch} sequences x {args.heads} heads, {args.pairs} pairs in "
        f"d={args.dim}, each shown {args.repeats}x (T={T}), chunk size {args.chunk}\n"
    )
    print("| memory | eta | recall cos before | after | max abs naive-chunk | chunk speed-up |")
    print("|---|---|---|---|---|---|")
    for label, (spec, eta) in MEMORIES.items():
        r = run_one(spec, eta, data, args.chunk)
        print(
            f"| {label} | {eta} | {r['before']:.3f} | {r['after']:.3f} | {r['max|naive-chunk|']:.1e} | "
            f"{r['speedup']:.1f}x |"
        )


if __name__ == "__main__":
    main()
