"""Benchmark: what the MLP memory's Triton kernels (`nestlearn/ops/memory/_mlp_kernels.py`) need of a GPU, found
without one: each kernel compiled ahead of time for a target (default sm_90, Hopper) with the launchers' settings,
printing its shared memory (against the target's limit), registers per thread, the bytes ptxas spills to local
memory and the compile seconds, per chunk length.

Why: a kernel that needs more shared memory than the card has fails only at its first launch on that card, and
spills show where a kernel will be slow; both are known from the compiled code, so the chunk lengths the kernels
take (`adjoint.MAX_CHUNK_FORWARD`, `MAX_CHUNK_BACKWARD`) are set from this table, measured on any machine with
Triton. What it is not: a timing (that is `benchmarks/memory_op.py` on a GPU). The compile of one backward takes
minutes on a 2-core CPU.

    python -m benchmarks.kernel_resources                    # D = 32, E = 128 (the 20M preset's heads), n = 16, 32, 64
    python -m benchmarks.kernel_resources --kernels forward --chunks 64 --stages 3
    python -m benchmarks.kernel_resources --chunks 64 --precisions tf32x3,tf32 --warps 8,16
    python -m benchmarks.kernel_resources --chunks 64 --precisions tf32 --variant titans   # Titans' switches
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nestlearn.ops.memory import _mlp_kernels as K

SHARED_LIMIT = {90: 232_448, 80: 166_912}  # bytes a block may use (sm_90: 227 KiB, sm_80: 163 KiB)
# the kernels' compile-time switches of the two memory families: HOPE's (DGD, self-generated values; the default)
# and the Titans variants' (plain GD, the keys' own values, each token's gradient clipped: `titans.titans_spec`)
SWITCHES = {
    "hope": dict(DGD=True, SELF_VALUES=True, L2=True, ACT=0, CLIP=False),
    "titans": dict(DGD=False, SELF_VALUES=False, L2=True, ACT=0, CLIP=True),
}
KERNELS = {"forward": K._mlp_forward_kernel, "backward": K._mlp_backward_kernel}


def compile_kernel(
    name: str,
    n: int,
    D: int,
    E: int,
    arch: int,
    stages: int,
    precision: str = "tf32x3",
    warps: int = K.NUM_WARPS,
    variant: str = "hope",
) -> tuple[object, float]:
    """`name`'s kernel for chunks of `n`, the `variant`'s switches (`SWITCHES`), the dots at `precision`
    (`_mlp_kernels.products`), `warps` warps a program."""
    fn = KERNELS[name]
    consts = dict(n=n, LOGN=n.bit_length() - 1, D=D, E=E, **SWITCHES[variant], P=precision)
    if "ANCHOR" in fn.arg_names:  # the backward: its flag and its scratch slots (`launch_mlp_backward`)
        consts.update(ANCHOR=True, SLOT=n * max(n, E), NS=K.NSLOT)
    kinds = {"N": "i32", "eps": "fp32", "clip": "fp32"}
    signature = {a: "constexpr" if a in consts else kinds.get(a, "*fp32") for a in fn.arg_names}
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})  # fmt: skip
    return compiled, time.perf_counter() - t0


def ptxas_report(compiled: object, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes) from ptxas's verbose output on the kernel's PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)  # fmt: skip
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="forward,backward")
    p.add_argument("--chunks", default="16,32,64", help="chunk lengths n")
    p.add_argument("--D", type=int, default=32)
    p.add_argument("--E", type=int, default=128)
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    p.add_argument("--stages", type=int, default=K.NUM_STAGES, help="num_stages (the launchers' by default)")
    choices = [x for x in K.GPU_PRECISIONS if x != "auto"]  # "auto" picks one of these per call
    p.add_argument("--precisions", default="tf32x3", help=f"dot precisions, of {', '.join(choices)}")
    p.add_argument("--warps", default=str(K.NUM_WARPS), help="num_warps values (the launchers' by default)")
    p.add_argument("--variant", default="hope", choices=sorted(SWITCHES), help="the compile-time switches")
    args = p.parse_args()
    precisions, warps = args.precisions.split(","), [int(w) for w in args.warps.split(",")]
    if set(precisions) - set(choices):
        p.error(f"--precisions takes {', '.join(choices)}, not {args.precisions!r}")
    limit = SHARED_LIMIT[args.arch]
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.variant} switches, D={args.D}, E={args.E}, "
          f"num_stages={args.stages}, shared memory limit {limit / 1024:.0f} KiB", flush=True)  # fmt: skip
    rows = []
    for name, n, precision, w in itertools.product(
        args.kernels.split(","), (int(c) for c in args.chunks.split(",")), precisions, warps
    ):
        compiled, secs = compile_kernel(name, n, args.D, args.E, args.arch, args.stages, precision, w, args.variant)
        regs, spill = ptxas_report(compiled, args.arch)
        shared = compiled.metadata.shared
        rows.append((name, n, precision, w, shared, "yes" if shared <= limit else "NO", regs, spill, secs))
        print(rows[-1], flush=True)
    print("\n| kernel | n | precision | warps | shared KiB | fits | registers | spill stores (B) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, precision, w, shared, fits, regs, spill, secs in rows:
        print(f"| {name} | {n} | {precision} | {w} | {shared / 1024:.0f} | {fits} | {regs} | {spill} | {secs:.0f} |")


if __name__ == "__main__":
    main()
