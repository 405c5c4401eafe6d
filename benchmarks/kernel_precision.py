"""Benchmark: what lower-precision matrix products would do to the MLP memory op's results, found without a GPU.
The chunk form (`memory_chunk`, the kernels' equations) runs in float32 with every matrix product's inputs
rounded first to tf32 (10 mantissa bits: one tensor-core pass, what `NESTLEARN_KERNEL_PRECISION=tf32` gives the
kernels) or to bf16, forward and backward (a dispatch mode rounds the inputs of `mm` / `bmm`); it prints each
result's relative error (Frobenius norm) against the same op in float64: outputs, final weights and the gradients
of q, k, v and the gates.

Why: the kernels' dots take three tensor-core passes each (tf32x3) for float32 accuracy, and their per-chunk
latency sets HOPE's and Titans' training speed (docs/results/speed.md); this says what one pass would cost in
accuracy before a GPU says what it saves in time. What it is not: the kernels themselves (their accumulation
order differs) or a timing.

    python -m benchmarks.kernel_precision                    # 2 x 4,096 tokens, 4 heads of 32, C = 64
    python -m benchmarks.kernel_precision --seq 1024 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nestlearn.ops.memory import MemorySpec, init_state, memory_chunk

PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
            torch.ops.aten.baddbmm.default}  # fmt: skip
NAMES = ("out", "W1", "W2", "dq", "dk", "dv", "deta", "dalpha", "dbeta")


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to nearest (ties to even) at tf32's 10 mantissa bits."""
    i = x.contiguous().view(torch.int32)
    i = (i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF
    return i.view(torch.float32)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


class RoundedProducts(TorchDispatchMode):
    """Every float32 matrix product's inputs rounded by `fn` (forward and autograd's backward alike)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in PRODUCTS:  # the two factors: the last two arguments (addmm / baddbmm add the first unrounded)
            *rest, a, b = args
            args = (*rest, *(self.fn(t) if t.dtype == torch.float32 else t for t in (a, b)))
        return func(*args, **(kwargs or {}))


def inputs(batch: int, seq: int, heads: int, dim: int, seed: int = 0) -> tuple[list[torch.Tensor], Any]:
    """Unit q, k, v; step sizes up to 2 / C, retention 0.98-1, momentum up to 0.9; a perturbed initial state."""
    g = torch.Generator().manual_seed(seed)
    unit = [torch.nn.functional.normalize(torch.randn(batch, seq, heads, dim, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(3)]  # fmt: skip
    eta = torch.rand(batch, seq, heads, generator=g, dtype=torch.float64) * 2 / 64
    alpha = 0.98 + 0.02 * torch.rand(batch, seq, heads, generator=g, dtype=torch.float64)
    beta = 0.9 * torch.rand(batch, seq, heads, generator=g, dtype=torch.float64)
    state = init_state(MemorySpec(), batch, heads, dim, dtype=torch.float64)
    state = state.map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype) / dim**0.5)
    return [*unit, eta, alpha, beta], state


def results(xs: list[torch.Tensor], state: Any, dtype: torch.dtype, mode: Any, chunk: int) -> list[torch.Tensor]:
    """Output, final weights and the input gradients of a fixed nonlinear loss, in float64."""
    args = [x.to(dtype).requires_grad_() for x in xs]
    with mode or contextlib.nullcontext():
        o, end = memory_chunk(*args, state=state.map(lambda t: t.to(dtype)), spec=MemorySpec(), chunk_size=chunk)
        grads = torch.autograd.grad((o * torch.cos(7 * o.detach())).sum(), args)
    return [t.detach().double() for t in (o, *end.weights, *grads)]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    xs, state = inputs(args.batch, args.seq, args.heads, args.dim)
    ref = results(xs, state, torch.float64, None, args.chunk)
    table = {}
    for label, mode in (
        ("float32", None),
        ("tf32", RoundedProducts(round_tf32)),
        ("bf16", RoundedProducts(round_bf16)),
    ):
        got = results(xs, state, torch.float32, mode, args.chunk)
        table[label] = {n: float((a - b).norm() / b.norm()) for n, a, b in zip(NAMES, got, ref, strict=True)}
    print(
        f"# MLP memory, {args.batch} x {args.seq} tokens, {args.heads} heads of {args.dim}, C = {args.chunk}; "
        f"relative error against float64 (Frobenius); torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print("| products | " + " | ".join(NAMES) + " |")
    print("|---" * (len(NAMES) + 1) + "|")
    for label, errs in table.items():
        print(f"| {label} | " + " | ".join(f"{errs[n]:.1e}" for n in NAMES) + " |")
    return table


if __name__ == "__main__":
    main()
