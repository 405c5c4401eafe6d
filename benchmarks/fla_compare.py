"""Benchmark: the linear memory's GPU path (`memory_fused`) against fla's Gated DeltaNet op at the same shape, in
one process on one card: tokens/s forward and forward + backward, and the ratio.

fla (`flash-linear-attention` / `fla-core`, installed from its wheels) runs `chunk_gated_delta_rule` in bf16 with
`use_qk_l2norm_in_kernel=True`; its backward refuses Triton < 3.7.1 on Hopper, which is recorded in the output
instead of a number (`benchmarks.memory_op.time_fla`). Ours: float32 state, L2 objective, DGD + momentum + decay,
C = 64 and 16. CUDA only.

    python -m benchmarks.fla_compare
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.memory_op import memory_call, memory_inputs, time_fla, timeit
from nestlearn.ops.memory import MemorySpec, memory_fused

B, T, H, D = 4, 4096, 8, 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = MemorySpec(kind="linear")
    x = memory_inputs(B, T, H, D, spec, "cuda")
    for backward in (False, True):
        fla, note = time_fla(B, T, H, D, backward, args)
        row = [f"{'fwd+bwd' if backward else 'fwd'}: fla GDN {'-' if fla is None else f'{fla:,.0f}'} tok/s ({note})"]
        for C in (64, 16):
            ours = B * T / timeit(memory_call(memory_fused, x, spec, C, backward), "cuda", args.warmup, args.reps)
            row.append(f"fused C={C} {ours:,.0f} tok/s" + (f" = {fla / ours:.1f}x slower than fla" if fla else ""))
        print("; ".join(row), flush=True)


if __name__ == "__main__":
    main()
