"""`nestlearn kernels`: compile the MLP memory kernels a run will launch before it starts, side by side.

What this is: `find_variants(model_cfg, device, seq_len, mode)` runs the model once (one sequence, a training step's
forward and backward under the run's autocast, or a generation's float32 prefill) with every kernel launch recorded
instead of made (that pass computes on the PyTorch loops), and `warm(variants, jobs)` compiles each recorded variant
in a process of its own by one tiny call of the memory op, so that Triton's cache (`TRITON_CACHE_DIR`, by default
`~/.triton/cache`) holds them all when the run begins. Why: a kernel variant (switches, chunk length, head shape,
dot precision, whether a call ends inside a chunk) compiles once per machine and a backward takes minutes (3 to 7
on the H200's host: docs/results/kernel_resources_sm90.md); a run meets its variants one after another, here they
compile at once. `main` is the command: the same config file and `key=value` overrides as `nestlearn train` (its
`data` is not needed).
What it is not: a cache of its own (Triton's), or of use without CUDA: on CPU the kernels run in Triton's
interpreter and nothing compiles (the command lists the variants and says so).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal

import torch

from .errors import user_errors
from .models import CausalLM, ModelConfig, preset
from .ops.memory import MemorySpec, init_state
from .ops.memory import adjoint as _adjoint

Mode = Literal["train", "generate"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled form of the MLP memory's kernels: what `adjoint._launch_key` tells apart, and whether the
    backward takes the anchor of a call that ends inside a chunk (`ANCHOR`)."""

    spec: MemorySpec
    n: int  # chunk length
    D: int  # head dim
    mixed: bool  # the call runs under bf16 / float16 autocast (one-pass tf32 dots: `_mlp_kernels.products`)
    anchor: bool
    backward: bool  # the backward kernel too, not only the forward
    device: str

    def describe(self) -> str:
        s = self.spec
        switches = [name for name, on in (("dgd", s.dgd), ("self_values", s.self_values)) if on]
        switches += [s.objective, s.activation] + ([f"clip {s.max_grad_norm:g}"] if s.max_grad_norm else [])
        kernels = "forward + backward" if self.backward else "forward"
        extra = ", ends inside a chunk" if self.anchor else ""
        return (f"{kernels}: {self.n}-token chunks, D = {self.D}, E = {s.expansion * self.D}, "
                f"{'/'.join(switches)}, {'autocast' if self.mixed else 'float32'}{extra}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# which variants a run launches


@contextlib.contextmanager
def _recording(seen: dict[tuple[Any, ...], set[str]]) -> Iterator[None]:
    """Every kernel launch recorded in `seen` (variant fields -> directions) instead of made: the calls fall back
    to the PyTorch loops, as where a GPU cannot launch a variant (`adjoint._launched`)."""
    launched = _adjoint._launched

    def record(key: tuple[Any, ...], launch: Any) -> bool:
        direction, device, n, D, _, spec, _ = key
        anchor = direction == "backward" and launch.args[5] is not None  # d_anchor (`_backward_kernel`)
        seen.setdefault((spec, n, D, bool(launch.keywords["mixed"]), anchor, device), set()).add(direction)
        return False

    _adjoint._launched = record
    try:
        yield
    finally:
        _adjoint._launched = launched


def find_variants(model_cfg: ModelConfig, device: torch.device, seq_len: int, mode: Mode, bf16: bool) -> list[Variant]:
    """The kernel variants one pass of `model_cfg` launches on `device` over one sequence of `seq_len` tokens: a
    training step's forward and backward (`bf16`: under bf16 autocast, as `nestlearn train` runs on CUDA), or a
    generation's prefill (float32, no gradient; the online CMS levels' learning steps included)."""
    torch.manual_seed(0)
    model = CausalLM(model_cfg).to(device)
    ids = torch.randint(0, model_cfg.vocab_size, (1, seq_len), device=device)
    seen: dict[tuple[Any, ...], set[str]] = {}
    with _recording(seen):
        if mode == "train":
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model.loss(ids)[0]
            loss.backward()
        else:
            model.eval()
            with torch.no_grad():
                model(ids, None)
    variants = [Variant(spec, n, D, mixed, anchor, "backward" in dirs, dev)
                for (spec, n, D, mixed, anchor, dev), dirs in seen.items()]  # fmt: skip
    return sorted(variants, key=lambda v: v.describe())


# ---------------------------------------------------------------------------------------------
# compiling them


def compile_variant(variant: Variant) -> tuple[float, str | None]:
    """One tiny call of the memory op that launches `variant`'s kernels (one sequence, one head; a chunk and a half
    for the anchor): -> (seconds, None) or (seconds, the error)."""
    t0 = time.perf_counter()
    try:
        dev = torch.device(variant.device)
        T = variant.n + (variant.n // 2 if variant.anchor else 0)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.nn.functional.normalize(torch.randn(1, T, 1, variant.D, generator=g), dim=-1).to(dev)
                   for _ in range(3))  # fmt: skip
        gates = [torch.full((1, T, 1), x, device=dev) for x in (0.01, 0.99, 0.5)]  # eta, alpha, beta
        state = init_state(variant.spec, 1, 1, variant.D, device=dev)
        q.requires_grad_(variant.backward)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=variant.mixed):
            o, _ = _adjoint.memory_adjoint(q, k, v, *gates, state=state, spec=variant.spec, chunk_size=variant.n,
                                           kernel=True)  # fmt: skip
        if variant.backward:
            o.float().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as err:  # reported per variant; the others still compile
        return time.perf_counter() - t0, f"{type(err).__name__}: {err}"[:300]
    return time.perf_counter() - t0, None


def warm(variants: list[Variant], jobs: int) -> list[tuple[float, str | None]]:
    """Compile `variants`, `jobs` at a time in processes of their own (1: in this process, one after another)."""
    if jobs <= 1 or len(variants) <= 1:
        return [compile_variant(v) for v in variants]
    with ProcessPoolExecutor(max_workers=min(jobs, len(variants)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:  # fmt: skip
        return list(pool.map(compile_variant, variants))


# ---------------------------------------------------------------------------------------------
# the command


USAGE = """examples:
  nestlearn kernels model=20M variant=hope                 # what `nestlearn train` with these settings launches
  nestlearn kernels --config my.yaml --for generate        # what `nestlearn generate` of that run launches
  nestlearn kernels model=20M variant=titans_lmm --list    # list them only"""


def main(argv: list[str] | None = None) -> list[tuple[Variant, float, str | None]]:
    from .train.config import load_config
    from .train.loop import resolve_device, uses_bf16

    p = argparse.ArgumentParser(prog="nestlearn kernels", description=__doc__.split("\n\n")[0], epilog=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", default=None, help="a `nestlearn train` config file (.yaml/.yml or .py)")
    p.add_argument("--for", dest="mode", choices=("train", "generate"), default="train",
                   help="a training step (bf16 autocast on CUDA unless precision=fp32) or a generation "
                   "(float32)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=None, help="compiles at once (default: one per variant, at most the "
                   "CPU count)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also NESTLEARN_DEBUG=1)")
    p.add_argument("overrides", nargs="*", help="key=value, as for `nestlearn train` (data is not needed)")
    args = p.parse_args(argv)
    with user_errors("nestlearn kernels", debug=args.debug):
        cfg = load_config(args.config, args.overrides, need_data=False)
        device = resolve_device(cfg.device)
        model_cfg = preset(cfg.model, cfg.variant, ablation=cfg.ablation, **cfg.model_overrides)
        bf16 = uses_bf16(cfg, device)
        variants = find_variants(model_cfg, device, cfg.seq_len, args.mode, bf16)
        if not variants:
            print(f"{cfg.variant} at {cfg.model} launches no MLP memory kernel on {device.type} (impl, head shape "
                  "or chunk length outside what the kernels take: `adjoint.kernel_supports`)")  # fmt: skip
            return []
        for v in variants:
            print(f"  {v.describe()}")
        if args.list or device.type != "cuda":
            if device.type != "cuda":
                print("no CUDA here: the kernels run in Triton's interpreter, nothing to compile")
            return [(v, 0.0, None) for v in variants]
        jobs = args.jobs or min(len(variants), multiprocessing.cpu_count())
        print(f"compiling {len(variants)} variant(s), {jobs} at a time ...", flush=True)
        t0 = time.perf_counter()
        results = warm(variants, jobs)
        for v, (seconds, error) in zip(variants, results, strict=True):
            print(f"  {seconds:6.1f} s  {v.describe()}" + (f"  FAILED: {error}" if error else ""))
        print(f"done in {time.perf_counter() - t0:.0f} s; Triton's cache now holds them")
        failed = [e for _, e in results if e]
        if failed:
            raise RuntimeError(f"{len(failed)} variant(s) did not compile; the first: {failed[0]}")
        return [(v, s, e) for v, (s, e) in zip(variants, results, strict=True)]


if __name__ == "__main__":
    main(sys.argv[1:])
