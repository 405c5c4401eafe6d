"""The project's speed table: every row measured in one process on one device, printed as one markdown table.

    python -m benchmarks.speed                               # every section, the device's defaults
    python -m benchmarks.speed --sections train --json t.json
    python -m benchmarks.speed --smoke --device cpu          # tiny shapes: the whole path in about a minute on CPU

The first line names the device and card, torch, Triton, the commit (`NESTLEARN_COMMIT`, else `git`) and the
date; one line of JSON is printed as each row finishes (and `--json PATH` is rewritten then), so a run stopped
early keeps its rows. A row that runs out of memory or raises is recorded with its error, not a crash.
Sections (`--sections`, default all):

- `train`: one LM training step (forward, next-token loss, backward, AdamW; `benchmarks.common.time_training`,
  bf16 autocast on CUDA) at preset 20M (batch 8 x 2,048) and 125M (batch 4 x 4,096) for Transformer++,
  Hope-Attention with a static CMS (`cms_online_layers=()`) and with online CMS levels in every block (the
  default, `cms_online_layers=None`), Titans LMM / MAC / MAG / MAL and HOPE (online CMS, the default, and static;
  static also with `impl="fused"`, the MLP memory's Triton kernels where the head's state fits on chip, and
  both with `compile_projection`, the projection step compiled, its compile inside the warm-up; static also with
  `compile_projection_budget=0.05`, which keeps less for the backward and recomputes the rest):
  tokens/s, ratio to eager Transformer++ of the same preset, model FLOP utilisation and peak CUDA memory
  (`--train-steps` timed steps after `--warmup`). `--graphs` adds, after each row, the
  same step with every block call replayed as a CUDA graph (`nestlearn.models.graphs.StepGraphs`; the note gives
  the warm-up's seconds, capture included); `--compile` adds each row under `torch.compile` as `nestlearn train
  compile=true` runs it (the warm-up, compile included, in the note; online CMS levels with buffer donation off,
  `train.loop.prepare_compile`). `--train-rows REGEX` keeps the rows whose label matches and
  `--no-eager` drops their eager runs (Transformer++'s eager row, the reference, always runs);
  `--train-presets 20M` keeps one preset.
  `--memory-save-every N` sets the recurrent variants' `memory_save_every` (every N-th chunk state kept for the
  backward, 0 none; the same results).
  **MFU** = model FLOPs per token x tokens/s / the card's dense bf16 peak (`PEAK_BF16`: H100 and H200 989e12,
  A100 312e12; none on CPU or an unknown card). Model FLOPs per token = 6 N (N = all parameters, the tied
  embedding once: the LM head's matmul) + 12 d_model K per attention layer, K the mean number of keys a query
  sees (causal: (T + 1) / 2; MAG / MAL: their window, plus the persistent tokens; MAC: its segment's tokens and
  their retrieved memory tokens, causally, plus the persistent tokens). Not counted: the memories' inner
  updates, the online CMS's inner backward and anything recomputed, so the memory variants' MFU is a lower bound
  on what their hardware does: it measures useful model work per second, as MFU does.
- `blocks`: one sequence mixer (the 340M preset's width, d_model 1,024, 16 heads of 64) forward + backward at
  T = 2,048 ... 16,384 with 16,384 tokens per step (batch = 16,384 / T), bf16 autocast on CUDA: Transformer++
  attention (its SDPA backend named in the note, read from the profiler's op names), fla's Gated DeltaNet (the
  `fla.layers.GatedDeltaNet` layer if it imports, else `chunk_gated_delta_rule` through
  `benchmarks.memory_op.time_fla`; where its backward refuses, the forward alone is timed and the reason kept),
  the Titans LMM memory layer (`TitansMemory`, the titans_lmm variant's mixer) and HOPE's self-modifying Titans
  (`SelfModifyingTitans`, the preset's chunk sizes): tokens/s, ratio to attention at the same T, peak CUDA memory
  above what was allocated before the row.
- `decode`: generation speed of one sequence (batch 1, float32 as `nestlearn generate` runs, greedy) at
  contexts 1K, 8K and 32K (`--contexts`) for Transformer++ (max_seq_len raised to fit) and HOPE at the 20M
  preset: the context's first ctx - 1 tokens are prefilled through the model's state API in pieces of 4,096
  (one prefill serves every context: to 1K, then on to 8K, then to 32K; the note gives its tokens/s), then
  `model(token, state)` steps from the context's last token: `--decode-warmup` steps, then `--decode-steps`
  timed. HOPE's online CMS learns once every S = 512 tokens (a forward + backward over the segment, in the step
  that reads the token after the segment: here the second warm-up step, timed alone); the row's tokens/s is the
  amortised rate S / ((S - 1) t_step + t_learn), the note gives the steady rate 1 / t_step and t_learn.
  On CUDA, HOPE again with its one-token block calls replayed as CUDA graphs (`models.graphs.DecodeGraphs`, as
  `nestlearn generate --cuda-graphs`): `GRAPH_WARMUP` more warm-up steps first, so that every call's graph is
  captured (a key's graph is captured the second time it is seen); the note counts the timed steps' replayed and
  eager block calls. Transformer++ has none (its cache grows at every token). `--decode-rows REGEX` keeps the rows
  whose label matches (and Transformer++'s, the reference). `--decode-impl chunk` runs HOPE's memories on the
  PyTorch chunk form instead of the preset's `impl` (the one-token steps take it anyway: the kernels need chunks
  of 16 tokens or more; the prefill and the CMS learning steps then run without compiling a kernel).
- `peers`: titans-pytorch 0.5.5's `NeuralMemory` against our `TitansMemory` (the blocks' width, batch 4 x
  4,096; titans-pytorch's `chunk_size` and TTT `batch_size` both 64, so its gradients are taken at the
  chunk-start weights and T / 64 chunks run in sequence, as in our chunk form, but it makes one update per chunk
  where ours updates per token; its default MLP memory of depth 2, expansion 4, with momentum), and
  nested-learning 0.2.0's HOPE (`HOPEModel`, block_variant "hope_selfmod": self-modifying Titans + CMS) against
  our HOPE at the 20M preset's sizes (batch 2 x 2,048; self-modifying chunks 64 / 64, CMS levels with our update
  periods, our static level as a period no sequence reaches; its memories are full-width, without heads, and its
  fast state is shared by the batch, so parameter counts differ: both are in the notes). Forward + backward:
  nested-learning's online training step for one chunk spanning the sequence (read with a fresh fast state,
  loss, backward, then its update pass with the teach signal under `no_grad`, where its memories learn), ours
  `loss(ids).backward()` (our memories learn inside the forward; with `--graphs` on CUDA also with its block
  calls replayed as CUDA graphs, `StepGraphs`, the first warm-up call capturing them, and again with
  `compile_projection`). The ratio is each row's
  tokens/s over our eager row's.
  The peers come from wheels (`scripts/fetch_peer_wheels.sh` downloads them into `.wheels/peers/`;
  `--install-peers` installs `.wheels/peers/*.whl` and `.wheels/*.whl` with `pip --no-deps --no-index` first,
  then starts the run again); a peer that does not import is recorded with the reason. `--peer-rows REGEX` keeps
  the rows whose label matches (a group's ratios need its reference row, "ours: ...", among them).

Peak memory (CUDA only; "-" on CPU, where one process's peak is not a row's): `train` as `time_training` reads
it (model, optimizer state and activations), `blocks` and `peers` above what was allocated before the row,
`decode` everything allocated during the timed steps (model, state, cache).
`--smoke`: the debug preset (batch 2 x 64), blocks at its width (128, 8 heads) with T in {64, 128}, contexts
{64, 256}, one warm-up and one timed step: every code path in under a minute on the 2-core CPU.
On the GPU: each row makes `--warmup` + `--train-steps` (or `--reps`) calls; estimated from earlier per-step
timings (not measured with this script yet), `train` takes 3 to 5 minutes and the other three sections together
about as long, so run them as two commands (`--sections train`, then `--sections blocks,decode,peers`);
`--max-minutes` stops starting rows after that time (they are recorded as skipped), so that the table is printed
within a command's limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.common import run_meta, sync, time_training
from benchmarks.memory_op import header, time_fla, timeit
from nestlearn.layers.fast_weights import Impl
from nestlearn.models import CausalLM, ModelConfig, next_token_loss, preset
from nestlearn.models.block import build_mixers
from nestlearn.models.config import RECURRENT, fields_for
from nestlearn.models.graphs import DecodeGraphs, StepGraphs
from nestlearn.models.presets import PRESETS

SECTIONS = ("train", "blocks", "decode", "peers")
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s per card
TRAIN_ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("transformer", "transformer", {}),
    ("hope_attention, static CMS", "hope_attention", {"cms_online_layers": ()}),
    ("hope_attention, online CMS", "hope_attention", {}),
    ("titans_lmm", "titans_lmm", {}),
    ("titans_mac", "titans_mac", {}),
    ("titans_mag", "titans_mag", {}),
    ("titans_mal", "titans_mal", {}),
    ("hope", "hope", {}),
    ("hope, static CMS", "hope", {"cms_online_layers": ()}),
    ("hope, static CMS, fused kernels", "hope", {"cms_online_layers": (), "impl": "fused"}),
    ("hope, compiled projection", "hope", {"compile_projection": True}),
    ("hope, static CMS, compiled projection", "hope", {"cms_online_layers": (), "compile_projection": True}),
    ("hope, static CMS, compiled projection, budget 0.05", "hope",
     {"cms_online_layers": (), "compile_projection": True, "compile_projection_budget": 0.05}),
)  # fmt: skip
GRAPH_WARMUP = 130  # decode steps before timing with DecodeGraphs: twice the chunk offsets' period (64), and 2
STATIC_PERIOD = 1 << 30  # nested-learning's update period for our static CMS level: no sequence reaches it


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes of one run (`FULL` or `SMOKE`)."""

    train: tuple[tuple[str, int, int], ...]  # (preset, batch, seq)
    block_width: str  # preset whose d_model and heads the blocks use
    block_T: tuple[int, ...]
    block_tokens: int  # tokens per step: batch = block_tokens // T
    decode_preset: str
    contexts: tuple[int, ...]
    prefill_chunk: int
    peer_titans_T: int
    peer_hope: tuple[str, int, int]  # (preset, batch, seq)


FULL = Plan(
    train=(("20M", 8, 2048), ("125M", 4, 4096)), block_width="340M", block_T=(2048, 4096, 8192, 16384),
    block_tokens=16384, decode_preset="20M", contexts=(1024, 8192, 32768), prefill_chunk=4096,
    peer_titans_T=4096, peer_hope=("20M", 2, 2048),
)  # fmt: skip
SMOKE = Plan(
    train=(("debug", 2, 64),), block_width="debug", block_T=(64, 128), block_tokens=128, decode_preset="debug",
    contexts=(64, 256), prefill_chunk=128, peer_titans_T=128, peer_hope=("debug", 1, 128),
)  # fmt: skip

Job = tuple[dict[str, Any], Callable[[], dict[str, Any]]]


# ---------------------------------------------------------------------------------------------
# shared helpers


def autocast(device: str) -> torch.autocast:
    """bf16 autocast on CUDA (the training dtype; fast weights stay float32), off on CPU."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def measure(fn: Callable[[], object], device: str, warmup: int, reps: int) -> dict[str, Any]:
    """Median seconds of `fn` (`memory_op.timeit`) and, on CUDA, its peak memory above the allocation before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    sec = timeit(fn, device, warmup, reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    return {"step_s": sec, "peak_gib": peak}


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, device: str) -> Callable[[], None]:
    """One forward + backward of a mixer (`module(x, None)`, first output) with gradients to x and the weights."""

    def call() -> None:
        module.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_(True)
        with autocast(device):
            out = module(xx, None)
        y = out[0] if isinstance(out, tuple) else out
        y.float().sum().backward()

    return call


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def guarded(fn: Callable[[], dict[str, Any]], device: str) -> dict[str, Any]:
    """Run one row; an out-of-memory or any other error is returned as the row's `error`, not raised."""
    try:
        row = fn()
    except torch.OutOfMemoryError:
        row = {"error": "out of memory"}
    except Exception as err:  # recorded, so one failing row does not hide the others
        lines = [line for line in str(err).strip().splitlines() if line.strip()] or [""]
        last = f" ... {lines[-1].strip()[:200]}" if len(lines) > 1 else ""  # TorchScript's cause comes last
        row = {"error": f"{type(err).__name__}: {lines[0][:160]}{last}"}
    gc.collect()  # the failed row's tensors are unreachable once the exception is gone
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# train


def mean_keys(T: int, span: int | None = None, segment: int | None = None) -> float:
    """Mean number of keys a query at positions 0 .. T-1 sees: causal, within `span`, within aligned segments."""
    total = 0
    for t in range(T):
        n = t + 1 if segment is None else t % segment + 1
        total += n if span is None else min(n, span)
    return total / T


def attention_keys(cfg: ModelConfig, T: int) -> float:
    """Mean keys per query of one block's attention (0 for the variants without attention)."""
    v = cfg.variant
    if v in ("transformer", "hope_attention"):
        return mean_keys(T, cfg.window)
    if v in ("titans_mag", "titans_mal"):
        return cfg.n_persistent + mean_keys(T, cfg.window)
    if v == "titans_mac":  # the segment's tokens and their retrieved memory tokens, both causal
        return cfg.n_persistent + 2 * mean_keys(T, segment=cfg.segment)
    return 0.0


def model_flops_per_token(cfg: ModelConfig, params: int, T: int) -> float:
    """6 N + 12 d_model K per attention layer (forward + backward; module docstring)."""
    return 6 * params + 12 * cfg.d_model * cfg.n_layers * attention_keys(cfg, T)


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def train_jobs(args: argparse.Namespace, plan: Plan) -> Iterator[Job]:
    peak = peak_flops(args.device)
    for name, batch, seq in plan.train:
        if args.train_presets and name not in args.train_presets.split(","):
            continue
        for (label, variant, over), mode in _train_modes(args):
            base = {"section": "train", "group": f"train {name}", "name": label + MODE_SUFFIX[mode],
                    "shape": f"{name}: {batch} x {seq}", "vs": "transformer",
                    "ref": variant == "transformer" and mode == "eager"}  # fmt: skip

            def run(name: str = name, variant: str = variant, over: dict = over, batch: int = batch, seq: int = seq,
                    mode: str = mode):  # fmt: skip
                fields = {"activation_checkpointing": args.checkpoint, **over, **save_every(variant, args)}
                cfg = preset(name, variant, **fields)
                r = time_training(cfg, batch=batch, seq=seq, device=args.device, steps=args.train_steps,
                                  warmup=args.warmup, graphs=mode == "graphs", compile=mode == "compile")  # fmt: skip
                flops = model_flops_per_token(cfg, r["params"], seq)
                r["flops_per_token"] = flops
                r["mfu"] = flops * r["tokens_per_s"] / peak if peak else None
                if args.device != "cuda":
                    r["peak_gib"] = r["reserved_gib"] = None  # the process's peak RSS so far, not this row's
                r["note"] = f"{r['params'] / 1e6:.1f}M params, step {r['step_s']:.3f} s, loss {r['final_loss']:.2f}"
                if mode != "eager":
                    r["note"] += f", warm-up with {'capture' if mode == 'graphs' else 'compile'} {r['capture_s']:.1f} s"
                return r

            yield base, run


def save_every(variant: str, args: argparse.Namespace) -> dict[str, int]:
    """`--memory-save-every` as a config field of the variants it applies to (the recurrent ones)."""
    return {"memory_save_every": args.memory_save_every} if variant in RECURRENT else {}


MODE_SUFFIX = {"eager": "", "graphs": " + CUDA graphs", "compile": " + torch.compile"}


def _train_modes(args: argparse.Namespace) -> Iterator[tuple[tuple[str, str, dict[str, Any]], str]]:
    """Each train row whose label `--train-rows` matches, eagerly unless `--no-eager`, then with `--graphs` with
    CUDA graphs (`nestlearn.models.graphs`) and with `--compile` under `torch.compile`. Transformer++'s eager row
    always runs: the ratios' reference."""
    for row in TRAIN_ROWS:
        label, variant, _ = row
        if not re.search(args.train_rows, label) and variant != "transformer":
            continue
        if not args.no_eager or variant == "transformer":
            yield row, "eager"
        if args.graphs:
            yield row, "graphs"
        if args.compile:
            yield row, "compile"


# ---------------------------------------------------------------------------------------------
# blocks


def mixer(variant: str, plan: Plan, device: str) -> torch.nn.Module:
    """The first sequence mixer of `variant` at the blocks' width, with that preset's settings."""
    sizes = PRESETS[plan.block_width]
    fields = {"variant": variant, "d_model": sizes["d_model"], "n_heads": sizes["n_heads"],
              "max_seq_len": max(plan.block_T)}  # fmt: skip
    torch.manual_seed(0)
    return build_mixers(ModelConfig(**fields_for(variant, fields)))[0].to(device)


def sdpa_backend(fn: Callable[[], object]) -> str:
    """Which SDPA kernel `fn` ran, from the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = " ".join(e.key for e in prof.key_averages())
    for key, label in (("cudnn_attention", "cudnn"), ("efficient_attention", "efficient"),
                       ("flash_attention_for_cpu", "flash (CPU)"), ("flash_attention", "flash"),
                       ("attention_math", "math")):  # fmt: skip
        if key in names:
            return label
    return "unknown"


def fla_row(B: int, T: int, H: int, d: int, args: argparse.Namespace) -> dict[str, Any]:
    """fla's Gated DeltaNet: the layer where `fla.layers` imports, else the op (`memory_op.time_fla`)."""
    if args.device != "cuda":
        return {"error": "skipped: fla's Triton kernels need CUDA"}
    try:
        from fla.layers import GatedDeltaNet
    except Exception:  # fla-core has no layers (or fla is missing): time the op
        GatedDeltaNet = None
    if GatedDeltaNet is not None:
        layer = GatedDeltaNet(hidden_size=H * d, num_heads=H, head_dim=d, expand_v=1, mode="chunk").to("cuda")
        x = torch.randn(B, T, H * d, device="cuda")
        r = measure(fwd_bwd(layer, x, "cuda"), "cuda", args.warmup, args.reps)
        return {**r, "tokens_per_s": B * T / r["step_s"], "note": f"fla.layers.GatedDeltaNet, {_version('fla-core')}"}
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    reps = SimpleNamespace(warmup=args.warmup, reps=args.reps)
    tok_s, note = time_fla(B, T, H, d, True, reps)
    what = "op chunk_gated_delta_rule, fwd+bwd"
    if tok_s is None and not note.startswith("fla not installed"):
        refusal = note
        tok_s, note = time_fla(B, T, H, d, False, reps)
        what = f"op chunk_gated_delta_rule, FORWARD ONLY (backward refused: {refusal})"
    if tok_s is None:
        return {"error": note}
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"tokens_per_s": tok_s, "step_s": B * T / tok_s, "peak_gib": peak, "note": f"{what}, {_version('fla-core')}"}


def block_jobs(args: argparse.Namespace, plan: Plan) -> Iterator[Job]:
    sizes = PRESETS[plan.block_width]
    D, H = sizes["d_model"], sizes["n_heads"]
    rows = (("attention (Transformer++)", "transformer", ""), ("fla Gated DeltaNet", "fla", ""),
            ("Titans LMM memory", "titans_lmm", "TitansMemory, MLP memory, chunk 64"),
            ("HOPE self-modifying Titans", "hope", "SelfModifyingTitans, chunks 64 / 64"))  # fmt: skip
    for T in plan.block_T:
        B = plan.block_tokens // T
        for label, variant, note in rows:
            base = {"section": "blocks", "group": f"blocks T={T}", "name": label,
                    "shape": f"D{D} H{H}: {B} x {T}", "vs": "attention", "ref": variant == "transformer"}  # fmt: skip
            if variant == "fla":
                yield base, lambda B=B, T=T: fla_row(B, T, H, D // H, args)
            else:
                yield base, lambda variant=variant, T=T, B=B, note=note: mixer_row(variant, B, T, plan, args, note)


# ---------------------------------------------------------------------------------------------
# decode


def decode_jobs(args: argparse.Namespace, plan: Plan) -> Iterator[Job]:
    """Per variant, one model and one prefill carried through the contexts in increasing order."""
    steps, warm = args.decode_steps, args.decode_warmup
    top = max(plan.contexts)
    rows = [("transformer", False), ("hope", False)] + ([("hope", True)] if args.device == "cuda" else [])
    for variant, graphs in rows:
        if not re.search(args.decode_rows, variant + (" + CUDA graphs" if graphs else "")) and variant != "transformer":
            continue
        over = {"max_seq_len": top + warm + steps + 1} if variant == "transformer" else {}
        over |= {"impl": args.decode_impl} if args.decode_impl and variant != "transformer" else {}
        carry: dict[str, Any] = {}

        def setup(variant: str = variant, over: dict = over, carry: dict = carry, graphs: bool = graphs) -> None:
            torch.manual_seed(0)
            cfg = preset(plan.decode_preset, variant, **over)
            carry.update(model=CausalLM(cfg).to(args.device).eval(), state=None, pos=0)
            g = torch.Generator().manual_seed(0)
            carry["ids"] = torch.randint(0, cfg.vocab_size, (1, top), generator=g).to(args.device)
            if graphs:
                carry["graphs"] = DecodeGraphs(carry["model"])

        def run(ctx: int, setup: Callable[[], None] = setup, carry: dict = carry) -> dict[str, Any]:
            if "model" not in carry:
                setup()
            try:
                return decode_at(carry, ctx, plan, args)
            except Exception:
                carry.clear()  # a later context starts again from an empty state
                raise

        for ctx in plan.contexts:
            base = {"section": "decode", "group": f"decode ctx={ctx}",
                    "name": variant + (" + CUDA graphs" if graphs else ""),
                    "shape": f"{plan.decode_preset}: 1 x ctx {ctx}", "vs": "transformer",
                    "ref": variant == "transformer"}  # fmt: skip
            yield base, lambda ctx=ctx, run=run: run(ctx)
        yield {}, carry.clear  # frees the model before the next variant


def decode_at(carry: dict[str, Any], ctx: int, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Prefill up to `ctx - 1` tokens (continuing the carried state), then step one token at a time."""
    model: CausalLM = carry["model"]
    dev = torch.device(args.device)
    ids = carry["ids"]
    t0, start = time.perf_counter(), carry["pos"]
    with torch.no_grad():
        while carry["pos"] < ctx - 1:
            n = min(plan.prefill_chunk, ctx - 1 - carry["pos"])
            _, carry["state"] = model(ids[:, carry["pos"] : carry["pos"] + n], carry["state"])
            carry["pos"] += n
        sync(dev)
        prefill = (carry["pos"] - start) / (time.perf_counter() - t0)
        state, tok = carry["state"], ids[:, ctx - 1 : ctx]

        def step() -> None:
            nonlocal state, tok
            logits, state = model(tok, state)
            tok = logits[:, -1:].argmax(-1)

        times = []  # warm-up steps, each timed: the second reads position ctx (the online CMS's learning step)
        graphs: DecodeGraphs | None = carry.get("graphs")
        for _ in range(args.decode_warmup + (GRAPH_WARMUP if graphs is not None else 0)):
            t = time.perf_counter()
            step()
            sync(dev)
            times.append(time.perf_counter() - t)
        before = None if graphs is None else dict(graphs.counts)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.decode_steps):
            step()
        sync(dev)
        t_step = (time.perf_counter() - t) / args.decode_steps
    S = model.online_segment
    learns = S is not None and ctx % S == 0 and len(times) >= 2
    t_learn = times[1] if learns else None
    amortised = S / ((S - 1) * t_step + t_learn) if learns else 1 / t_step
    note = f"steady {1 / t_step:,.1f} tok/s ({1e3 * t_step:.1f} ms), prefill {prefill:,.0f} tok/s"
    if learns:
        note += f", CMS learning step {1e3 * t_learn:.0f} ms every {S} tokens"
    if graphs is not None and before is not None:
        replayed, eager = (graphs.counts[k] - before[k] for k in ("replayed", "eager"))
        note += f", {len(graphs.graphs)} graphs, timed steps: {replayed} block calls replayed, {eager} eager"
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"tokens_per_s": amortised, "step_s": t_step, "steady_tokens_per_s": 1 / t_step, "learn_step_s": t_learn,
            "prefill_tokens_per_s": prefill, "peak_gib": peak, "note": note}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# peers


def peer_jobs(args: argparse.Namespace, plan: Plan) -> Iterator[Job]:
    """The peers rows whose label `--peer-rows` matches (each group's first row is its ratios' reference)."""
    for base, fn in _peer_jobs(args, plan):
        if re.search(args.peer_rows, base["name"]):
            yield base, fn


def _peer_jobs(args: argparse.Namespace, plan: Plan) -> Iterator[Job]:
    sizes = PRESETS[plan.block_width]
    D, H, T = sizes["d_model"], sizes["n_heads"], plan.peer_titans_T
    B = plan.block_tokens // T
    group = {"section": "peers", "group": "peers titans", "shape": f"D{D} H{H}: {B} x {T}, chunk 64", "vs": "ours"}
    yield {**group, "name": "ours: TitansMemory", "ref": True}, lambda: mixer_row("titans_lmm", B, T, plan, args)
    yield {**group, "name": "titans-pytorch NeuralMemory", "ref": False}, lambda: titans_peer_row(B, T, plan, args)
    name, batch, seq = plan.peer_hope
    group = {"section": "peers", "group": "peers hope", "shape": f"{name} sizes: {batch} x {seq}", "vs": "ours"}
    yield {**group, "name": "ours: HOPE (CausalLM)", "ref": True}, lambda: hope_row(None, batch, seq, args, plan)
    if args.graphs and args.device == "cuda":
        name = "ours: HOPE + CUDA graphs"
        yield {**group, "name": name, "ref": False}, lambda: hope_row("graphs", batch, seq, args, plan)
        name = "ours: HOPE + CUDA graphs, compiled projection"
        yield {**group, "name": name, "ref": False}, lambda: hope_row("graphs+compile", batch, seq, args, plan)
    yield {**group, "name": "nested-learning HOPEModel", "ref": False}, lambda: hope_row("peer", batch, seq, args, plan)


def _version(package: str) -> str:
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} (version unknown)"


def mixer_row(variant: str, B: int, T: int, plan: Plan, args: argparse.Namespace, note: str = "") -> dict[str, Any]:
    """Forward + backward of one of our mixers at the blocks' width; attention's note names its SDPA backend."""
    module = mixer(variant, plan, args.device)
    x = torch.randn(B, T, PRESETS[plan.block_width]["d_model"], device=args.device)
    call = fwd_bwd(module, x, args.device)
    r = measure(call, args.device, args.warmup, args.reps)
    if variant == "transformer":
        note = f"SDPA backend: {sdpa_backend(call)}"
    note = ", ".join(filter(None, [note, f"{n_params(module):,} params"]))
    return {**r, "tokens_per_s": B * T / r["step_s"], "params": n_params(module), "note": note}


def titans_peer_row(B: int, T: int, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    try:
        from titans_pytorch import NeuralMemory
    except Exception as err:
        return {"error": f"titans-pytorch does not import: {type(err).__name__}: {err}"[:200]}
    sizes = PRESETS[plan.block_width]
    D, H = sizes["d_model"], sizes["n_heads"]
    chunk = ModelConfig().mem_chunk
    torch.manual_seed(0)
    module = NeuralMemory(dim=D, heads=H, dim_head=D // H, chunk_size=chunk, batch_size=chunk).to(args.device)
    x = torch.randn(B, T, D, device=args.device)
    # its scripted helpers' fused CUDA code does not compile under CUDA 13's NVRTC with bf16 ("nvrtc compilation
    # failed", H200, torch 2.11): TorchScript's fuser is off for this row, so they run op by op
    fuser = torch._C._jit_texpr_fuser_enabled()
    torch._C._jit_set_texpr_fuser_enabled(False)
    try:
        r = measure(fwd_bwd(module, x, args.device), args.device, args.warmup, args.reps)
    finally:
        torch._C._jit_set_texpr_fuser_enabled(fuser)
    note = f"{_version('titans-pytorch')}, {n_params(module):,} params, TorchScript fuser off"
    return {**r, "tokens_per_s": B * T / r["step_s"], "params": n_params(module), "note": note}


def peer_hope_model(cfg: ModelConfig) -> torch.nn.Module:
    """nested-learning's HOPE (Eqs. 94-97: self-modifying Titans + CMS) at our config's sizes and chunks."""
    from nested_learning.levels import LevelSpec
    from nested_learning.model import HOPEModel
    from nested_learning.model import ModelConfig as PeerConfig

    levels = [LevelSpec(f"cms_{i}", c or STATIC_PERIOD) for i, c in enumerate(cfg.cms_levels)]
    peer = PeerConfig(
        vocab_size=cfg.vocab_size, dim=cfg.d_model, num_layers=cfg.n_layers, heads=cfg.n_heads,
        titan_level=LevelSpec("titan", cfg.mem_chunk), cms_levels=levels, block_variant="hope_selfmod",
        self_mod_chunk_size=cfg.proj_chunk, self_mod_chunk_size_memory=cfg.mem_chunk,
    )  # fmt: skip
    return HOPEModel(peer)


def hope_row(which: str | None, batch: int, seq: int, args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Forward + backward of our HOPE (`which=None`; `"graphs"`: its block calls replayed as CUDA graphs, the
    first warm-up call capturing them, as `nestlearn train cuda_graphs=true` runs it; `"graphs+compile"`: the
    same with `compile_projection`, the projection memories' chunk steps compiled) or nested-learning's
    (`"peer"`) on one batch of random ids."""
    cfg = preset(plan.peer_hope[0], "hope")
    if which == "graphs+compile":
        cfg = dataclasses.replace(cfg, compile_projection=True)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=args.device)
    if which in (None, "graphs", "graphs+compile"):
        model = CausalLM(cfg).to(args.device)
        captured = StepGraphs(model) if which in ("graphs", "graphs+compile") else None

        def call() -> None:
            model.zero_grad(set_to_none=True)
            with autocast(args.device):
                logits = model(ids)[0] if captured is None else captured.logits(ids)
                loss = next_token_loss(logits[:, :-1], ids[:, 1:])
            loss.backward()

        note = f"{n_params(model):,} params"
    else:
        try:
            from nested_learning.training import compute_teach_signal

            model = peer_hope_model(cfg).to(args.device)
        except Exception as err:
            return {"error": f"nested-learning does not import: {type(err).__name__}: {err}"[:200]}

        def call() -> None:
            model.zero_grad(set_to_none=True)
            fast = model.init_fast_state()
            with autocast(args.device):
                logits = model(ids, fast_state=fast)
                loss = next_token_loss(logits[:, :-1], ids[:, 1:])
            loss.backward()
            teach = compute_teach_signal(model, logits, ids)
            with torch.no_grad(), autocast(args.device):
                model(ids, teach_signal=teach, fast_state=fast)

        note = f"{_version('nested-learning')}, {n_params(model):,} params"
    r = measure(call, args.device, args.warmup, args.reps)
    return {**r, "tokens_per_s": batch * seq / r["step_s"], "params": n_params(model), "note": note}


# ---------------------------------------------------------------------------------------------
# the run


JOBS = {"train": train_jobs, "blocks": block_jobs, "decode": decode_jobs, "peers": peer_jobs}


def install_peers() -> None:
    """pip install --no-deps --no-index the wheels of .wheels/peers/ and .wheels/ (one file per name)."""
    wheels: dict[str, str] = {}
    for path in sorted(glob.glob(".wheels/peers/*.whl")) + sorted(glob.glob(".wheels/*.whl")):
        wheels.setdefault(os.path.basename(path).split("-")[0].lower(), path)
    if not wheels:
        print("--install-peers: no wheels under .wheels/ (run scripts/fetch_peer_wheels.sh)", flush=True)
        return
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", *wheels.values()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(f"--install-peers: {len(wheels)} wheels, pip exit {done.returncode} {done.stderr.strip()[-400:]}", flush=True)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio = tokens/s over the reference row's of the same group."""
    refs = {r["group"]: r.get("tokens_per_s") for r in rows if r.get("ref")}
    for r in rows:
        ref, tok = refs.get(r["group"]), r.get("tokens_per_s")
        r["ratio"] = tok / ref if tok and ref else None


def table(head: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        head,
        "",
        "| section | row | shape | tokens/s | ratio | vs | MFU | peak GiB | reserved GiB | note |",
        "|" + "---|" * 10,
    ]
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r["group"], len(order))
    for r in sorted(rows, key=lambda r: (SECTIONS.index(r["section"]), order[r["group"]])):
        tok = r.get("tokens_per_s")
        cells = [
            r["section"], r["name"], r["shape"],
            "-" if tok is None else f"{tok:,.0f}" if tok >= 100 else f"{tok:.2f}",
            "-" if r.get("ratio") is None else f"{r['ratio']:.3f}x", r["vs"],
            "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
            "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}",
            "-" if r.get("reserved_gib") is None else f"{r['reserved_gib']:.2f}",
            r.get("error") or r.get("note", ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (debug preset): every path, quickly")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps per row (2; smoke 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps / calls before timing (train, blocks, peers)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per blocks / peers row (median; 2, smoke 1)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (32; smoke 4)")
    p.add_argument("--contexts", default=None, help="decode contexts, e.g. 1024,8192 (default 1K, 8K, 32K)")
    p.add_argument("--decode-warmup", type=int, default=3, help="decode steps before timing (>= 2: see docstring)")
    p.add_argument("--checkpoint", action="store_true", help="train rows with activation checkpointing")
    p.add_argument("--memory-save-every", type=int, default=1, metavar="N",
                   help="train rows of the recurrent variants keep every N-th chunk state (0: none; ModelConfig."
                        "memory_save_every)")  # fmt: skip
    p.add_argument("--graphs", action="store_true", help="train rows also with CUDA graphs (models/graphs.py)")
    p.add_argument("--compile", action="store_true", help="train rows also under torch.compile")
    p.add_argument("--train-rows", default="", help="regex: only train rows whose label matches (and transformer)")
    p.add_argument("--train-presets", default="", help="comma-separated: only these train presets (e.g. 20M)")
    p.add_argument("--decode-rows", default="", help="regex: only decode rows whose label matches (and transformer)")
    p.add_argument("--peer-rows", default="", help="regex: only peers rows whose label matches (keep the references)")
    p.add_argument(
        "--decode-impl",
        default="",
        choices=("", *typing.get_args(Impl)),
        help="the decode rows' memory impl (default: the preset's)",
    )
    p.add_argument(
        "--no-eager", action="store_true", help="train rows only with --graphs / --compile (transformer eager too)"
    )
    p.add_argument("--max-minutes", type=float, default=None, help="start no row after this many minutes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the header, run settings and raw rows here")
    p.add_argument("--install-peers", action="store_true", help="pip install .wheels/peers/*.whl first (no deps)")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.plan = SMOKE if args.smoke else FULL
    presets = [name for name, _, _ in args.plan.train]
    unknown_presets = set(filter(None, args.train_presets.split(","))) - set(presets)
    if unknown_presets:
        p.error(f"--train-presets: no train preset {sorted(unknown_presets)} in this plan; choose from {presets}")
    if args.contexts:
        args.plan = dataclasses.replace(args.plan, contexts=tuple(sorted(int(c) for c in args.contexts.split(","))))
    for name, full, smoke in (("train_steps", 2, 1), ("reps", 2, 1), ("decode_steps", 32, 4)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sections; print each row's JSON as it finishes and the table at the end; return the rows."""
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.install_peers:
        install_peers()
        if argv is None:  # start again, so that torch sees what was installed now (numpy among it) at its import
            rest = [a for a in sys.argv[1:] if a != "--install-peers"]
            os.execv(sys.executable, [sys.executable, "-m", "benchmarks.speed", *rest])
    head = header(args.device).replace(" threads=", f" triton={_triton()} threads=")
    meta = run_meta(args.device, triton=_triton(), smoke=args.smoke, sections=args.sections,
                    train_steps=args.train_steps, warmup=args.warmup, reps=args.reps, decode_steps=args.decode_steps,
                    checkpoint=args.checkpoint, memory_save_every=args.memory_save_every, graphs=args.graphs,
                    compile=args.compile, decode_impl=args.decode_impl or "preset",
                    plan=dataclasses.asdict(args.plan))  # fmt: skip
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes is not None else float("inf")
    print(head, flush=True)
    rows: list[dict[str, Any]] = []
    for section in SECTIONS:
        if section not in args.sections.split(","):
            continue
        for base, fn in JOBS[section](args, args.plan):
            if not base:  # a clean-up step between rows
                fn()
                continue
            row = dict(base)
            t0 = time.monotonic()
            row.update({"error": "skipped: --max-minutes reached"} if t0 > deadline else guarded(fn, args.device))
            row["wall_s"] = round(time.monotonic() - t0, 2)
            rows.append(row)
            add_ratios(rows)
            print(json.dumps(row, default=str), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"header": head, "meta": meta, "rows": rows}, indent=1))
    print()
    print(table(head, rows), flush=True)
    return rows


def _triton() -> str:
    for name in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


if __name__ == "__main__":
    main()
