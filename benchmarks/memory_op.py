"""Benchmark: tokens/s of the deep-memory op, `naive` (per-token) vs `chunk` vs the GPU paths (`affine`: the linear
memory's affine form, `fused` the same with the Triton scan; `lean`: the memory-lean backward; `adjoint`: the MLP
memory's hand-derived backward, `adjoint_kernel` the same with its forward and backward (chunks up to 64; longer:
the PyTorch loop) as one Triton program per head (state on chip: D * E <= 8,192, e.g. d = 32 with
expansion 4); `fla`: fla's Gated DeltaNet op at the same shape with
`--fla`), with causal SDPA attention at the same B, H, T, d timed in the same process, and the peak memory of
forward + backward on CUDA.
Prints a ratio table last; `--json` keeps the raw numbers.

What it times: forward, and forward + backward (gradients to q, k, v, gates and the initial state), after
warm-ups, median over repeats, with device synchronisation around each timed call only. Memory runs in
float32 (D8); SDPA runs in bf16 on CUDA (the dtype attention is trained in) and float32 on CPU.

    python -m benchmarks.memory_op                      # CPU defaults (2-core CI machine: T = 1024)
    python -m benchmarks.memory_op --device cuda        # GPU defaults (T = 4096 and more)
    # one model's memory per chunk: Titans LMM 20M's layer (plain GD, clip) and HOPE's projection memories'
    # one-chunk calls (self-generated values, 4 memories x 8 heads stacked), the kernels and the chunk form only
    NESTLEARN_KERNEL_PRECISION=tf32 python -m benchmarks.memory_op --kinds mlp --switches titans \
        --cases 8,2048,64,8,32 --paths chunk,adjoint_kernel
    python -m benchmarks.memory_op --kinds mlp --switches self_values --cases 8,64,64,32,32 --paths adjoint_kernel
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nestlearn.layers.titans import INNER_GRAD_CLIP
from nestlearn.ops.memory import MemorySpec, MemoryState, init_state, memory_chunk, memory_fused, memory_naive
from nestlearn.ops.memory.adjoint import kernel_supports, memory_adjoint
from nestlearn.ops.memory.adjoint import supports as adjoint_supports
from nestlearn.ops.memory.affine import memory_affine
from nestlearn.ops.memory.affine import supports as affine_supports
from nestlearn.ops.memory.fused import supports
from nestlearn.ops.memory.lean import memory_lean

# the memory's switches besides `kind` (`--switches`): MemorySpec's defaults, the Titans variants' memory
# (`titans.titans_spec`: plain GD, each token's gradient clipped) and HOPE's projection memories' (self-generated
# values, Eq. 84)
SWITCHES = {
    "default": {},
    "titans": {"dgd": False, "max_grad_norm": INNER_GRAD_CLIP},
    "self_values": {"self_values": True},
}

# (B, T, C, H, d)
CPU_CASES = [(1, 1024, 16, 4, 64), (1, 1024, 64, 4, 64), (2, 1024, 64, 8, 64)]
GPU_CASES = [(4, 4096, 64, 8, 64), (4, 4096, 16, 8, 64), (4, 4096, 256, 8, 64), (1, 16384, 64, 8, 64)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median seconds of `fn()` over `reps` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_inputs(B: int, T: int, H: int, d: int, spec: MemorySpec, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, device=device, generator=g)

    def unif(*s: int) -> torch.Tensor:
        return torch.rand(*s, device=device, generator=g)

    st = init_state(spec, B, H, d, device=device)
    return {
        "q": F.normalize(rnd(B, T, H, d), dim=-1),
        "k": F.normalize(rnd(B, T, H, d), dim=-1),
        "v": rnd(B, T, H, d),
        "eta": 0.1 * unif(B, T, H),
        "alpha": 1 - 0.1 * unif(B, T, H),
        "beta": 0.9 * unif(B, T, H),
        "weights": list(st.weights),
        "momenta": list(st.momenta),
    }


def memory_call(op, x: dict, spec: MemorySpec, C: int, backward: bool) -> Callable[[], object]:
    leaves = [x[n] for n in ("q", "k", "v", "eta", "alpha", "beta")] + x["weights"] + x["momenta"]

    def call() -> None:
        ins = [t.detach().requires_grad_(backward) for t in leaves]
        q, k, v, eta, alpha, beta, *rest = ins
        n = len(x["weights"])
        st = MemoryState(tuple(rest[:n]), tuple(rest[n:]))
        o, s = op(q, k, v, eta, alpha, beta, state=st, spec=spec, chunk_size=C)
        if backward:
            (o.sum() + sum(w.sum() for w in s.weights)).backward()

    return call


def sdpa_call(B: int, T: int, H: int, d: int, device: str, backward: bool) -> Callable[[], object]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype) for _ in range(3))

    def call() -> None:
        qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        if backward:
            o.sum().backward()

    return call


def paths(
    spec: MemorySpec, x: dict, C: int, device: str, keep: set[str] | None = None
) -> dict[str, Callable[..., object]]:
    """The memory ops timed for this spec: `chunk` always; on CUDA the memory-lean path, for the MLP memory the
    hand-derived backward (`ops/memory/adjoint.py`; with its forward kernel where the state fits on chip), and for
    the linear memory the affine form with its scan as a
    PyTorch loop (`affine`) and as the Triton kernel (`fused`) where they apply; only those named in `keep`, if
    given."""
    ops: dict[str, Callable[..., object]] = {"chunk": memory_chunk}
    state = MemoryState(tuple(x["weights"]), tuple(x["momenta"]))
    if device == "cuda":
        ops["lean"] = memory_lean
    if adjoint_supports(spec, state) and device == "cuda":
        ops["adjoint"] = memory_adjoint
        if kernel_supports(x["q"], state, C):
            ops["adjoint_kernel"] = functools.partial(memory_adjoint, kernel=True)
    if affine_supports(spec, state) and device == "cuda":
        ops["affine"] = memory_affine
    if supports(spec, state, x["q"]):
        ops["fused"] = memory_fused
    return {name: op for name, op in ops.items() if keep is None or name in keep}


def bench_case(case: tuple[int, ...], kind: str, device: str, args: argparse.Namespace) -> dict:
    B, T, C, H, d = case
    spec = MemorySpec(kind=kind, **(SWITCHES[args.switches] if kind == "mlp" else {}))
    keep = set(args.paths.split(",")) if args.paths else None
    x = memory_inputs(B, T, H, d, spec, device)
    # the naive loop is linear in T: time it on at most --naive-tokens and report tokens/s
    Tn = min(T, args.naive_tokens)
    xn = memory_inputs(B, Tn, H, d, spec, device)
    row: dict = {"B": B, "T": T, "C": C, "H": H, "d": d, "kind": kind, "switches": args.switches}
    for bwd in (False, True):
        tag = "fwdbwd" if bwd else "fwd"
        if keep is None or "naive" in keep:
            row[f"{tag}_naive_tok_s"] = B * Tn / timeit(memory_call(memory_naive, xn, spec, C, bwd), device, 1,
                                                         args.naive_reps)  # fmt: skip
            row[f"{tag}_naive_T"] = Tn
        row[f"{tag}_sdpa_tok_s"] = B * T / timeit(sdpa_call(B, T, H, d, device, bwd), device, args.warmup, args.reps)
        if args.fla and device == "cuda":
            row[f"{tag}_fla_tok_s"], row[f"{tag}_fla_note"] = time_fla(B, T, H, d, bwd, args)
        for name, op in paths(spec, x, C, device, keep).items():
            call = memory_call(op, x, spec, C, bwd)
            row[f"{tag}_{name}_tok_s"] = B * T / timeit(call, device, args.warmup, args.reps)
            row[f"{tag}_{name}_peak_mb"] = peak_mb(call, device)
    return row


def time_fla(B: int, T: int, H: int, d: int, backward: bool, args: argparse.Namespace) -> tuple[float | None, str]:
    """fla's `chunk_gated_delta_rule` (Gated DeltaNet) at the same shape, bf16 as fla trains it; None and the
    reason when fla is missing or refuses (fla 0.6.0's gated backward needs Triton >= 3.7.1 on Hopper)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as err:
        return None, f"fla not installed ({err})"
    q, k, v = (torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda")).to(torch.bfloat16)
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)

    def call() -> None:
        ins = [t.detach().requires_grad_(backward) for t in (q, k, v, g, beta)]
        o, _ = chunk_gated_delta_rule(*ins, use_qk_l2norm_in_kernel=True)
        if backward:
            o.sum().backward()

    try:
        return B * T / timeit(call, "cuda", args.warmup, args.reps), "ok"
    except Exception as err:  # a refusal is a result to report, not a crash
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def peak_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it (None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def header(device: str) -> str:
    commit = os.environ.get("NESTLEARN_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        except OSError:
            commit = "?"
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return (
        f"# device={device} card={card} torch={torch.__version__} threads={threads} "
        f"commit={commit.strip() or '?'} date={time.strftime('%Y-%m-%d')}"
    )


def table(rows: list[dict]) -> str:
    """One line per case, pass and path: tokens/s, ratio to the chunk form and to SDPA, peak MiB."""
    lines = ["| kind | switches | B | T | C | H | d | pass | path | tok/s | x chunk | x SDPA | MiB |",
             "|" + "---|" * 13]  # fmt: skip
    for r in rows:
        for tag in ("fwd", "fwdbwd"):
            chunk, sdpa = r.get(f"{tag}_chunk_tok_s"), r[f"{tag}_sdpa_tok_s"]  # no chunk row under --paths
            names = [k[len(tag) + 1 : -len("_tok_s")] for k in r if k.startswith(f"{tag}_") and k.endswith("_tok_s")]
            for name in names:
                t = r[f"{tag}_{name}_tok_s"]
                lines.append(
                    f"| {r['kind']} | {r.get('switches', 'default')} | {r['B']} | {r['T']} | {r['C']} | {r['H']} | "
                    f"{r['d']} | {tag} | {name} | "
                    f"{_num(t)} | {_ratio(t, chunk)} | {_ratio(t, sdpa)} | {_num(r.get(f'{tag}_{name}_peak_mb'))} |"
                )
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.3f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kinds", default="mlp,linear")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--naive-reps", type=int, default=2)
    p.add_argument("--naive-tokens", type=int, default=None, help="cap on T of the naive loop (none on CPU, 4096 else)")
    p.add_argument("--threads", type=int, default=2 if not torch.cuda.is_available() else None)
    p.add_argument("--json", default=None, help="write raw rows here")
    p.add_argument("--max-cases", type=int, default=None, help="time only the first N cases of each kind")
    p.add_argument("--cases", default=None, help="B,T,C,H,d cases separated by ';' instead of the defaults")
    p.add_argument("--fla", action="store_true", help="also time fla's chunk_gated_delta_rule (CUDA, if installed)")
    p.add_argument("--switches", default="default", choices=sorted(SWITCHES), help="the MLP memory's switches")
    p.add_argument("--paths", default=None, help="time only these paths (comma-separated: naive, chunk, lean, "
                   "adjoint, adjoint_kernel, affine, fused)")  # fmt: skip
    p.set_defaults(naive_tokens=1 << 30 if p.parse_known_args()[0].device == "cpu" else 4096)  # by device
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = (GPU_CASES if args.device == "cuda" else CPU_CASES)[: args.max_cases]
    if args.cases:
        cases = [tuple(int(v) for v in c.split(",")) for c in args.cases.split(";")]
    rows = []
    for kind in args.kinds.split(","):
        for case in cases:
            rows.append(bench_case(case, kind, args.device, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header(args.device), "rows": rows}, f, indent=1)
    print(header(args.device))
    print(table(rows))


if __name__ == "__main__":
    main()
