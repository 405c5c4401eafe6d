"""The training loop of `nestlearn train`: set-up, steps with non-finite guards, evaluation, safe stops.

What this is: `train(cfg)`. Set-up checks everything a user can get wrong before any work (device, a writable
`out`, the data's sizes and hashes, token ids against the vocabulary, the sequence length against the model),
builds the model (DDP or FSDP2 under torchrun), the optimizer (`nestlearn.optim.route`) and resumes from the
newest intact checkpoint (`checkpoints.py`). Per step: the step's global batch, drawn by step index from the
shards and split into `grad_accum` micro-batches (so a resumed, distributed or accumulating run sees the same
sequences); bf16 autocast on CUDA; clipping; then one host sync reads the loss and the gradient norm: a step
whose loss or gradient norm is NaN or inf is skipped (no optimizer update; counted and logged), and
`max_nonfinite` of them in a row stop the run (`TrainingDiverged`) with the newest good checkpoint untouched.
SIGINT / SIGTERM let the current step finish, write a checkpoint and return (a second Ctrl-C aborts at once);
`max_minutes` ends the run evaluated and checkpointed. Under torchrun every such decision is agreed by all
ranks in the step's one all-reduce.
What it is not: configuration parsing (`config.py`), logging (`metrics.py`), checkpoint files
(`checkpoints.py`), the command line (`command.py`) or data preparation (`nestlearn data prepare`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch._functorch.config
import torch.distributed as dist

from ..data.shards import Shards
from ..models import CausalLM, next_token_loss, preset
from ..models.graphs import StepGraphs
from ..optim import route
from .checkpoints import TrainingDiverged, newest_name, resume, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsLog, finite_or_none
from .run import Run, Stop


class StepResult(NamedTuple):
    loss: float
    grad_norm: float
    finite: bool
    signalled: bool
    out_of_time: bool


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Run (or resume) training; returns the metric records of the whole run (rank 0; [] on other ranks)."""
    with Stop() as stop, contextlib.ExitStack() as scope:
        run = _setup(cfg, stop, scope)
        try:
            _loop(run)
            if dist.is_initialized():
                dist.barrier()  # no rank tears its process group down while another still uses it
        finally:
            run.log.close()
            if dist.is_initialized():
                dist.destroy_process_group()
    return run.log.records


# ---------------------------------------------------------------------------------------------
# set-up


def _setup(cfg: TrainConfig, stop: Stop, scope: contextlib.ExitStack) -> Run:
    rank, world, device, mode = _distributed(cfg)
    if rank == 0:
        for message in cfg.warnings():
            print(f"warning: {message}", file=sys.stderr, flush=True)
    out = Path(cfg.out)
    _check_writable(out)
    shards = _open_data(cfg, rank)
    model_cfg = preset(cfg.model, cfg.variant, ablation=cfg.ablation,
                       **{"vocab_size": shards.meta["tokenizer"]["vocab_size"], **cfg.model_overrides})  # fmt: skip
    _check_fits(cfg, model_cfg, shards)
    torch.manual_seed(cfg.seed)
    core = CausalLM(model_cfg).to(device)
    model: torch.nn.Module = core
    if mode == "ddp":
        ids = [device.index] if device.index is not None else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)
    elif mode == "fsdp":
        _check_fsdp(cfg)
        _shard(core)
    if cfg.compile:
        scope.enter_context(prepare_compile(core))  # for the run (`train`)
        model = torch.compile(model)
    opt = route(core, cfg.optimizer, lr=cfg.matrix_lr, adamw_lr=cfg.lr, weight_decay=cfg.weight_decay,
                adamw_kwargs={"betas": (0.9, 0.95)})  # fmt: skip
    base_lrs = [g["lr"] for g in opt.param_groups]
    run = Run(cfg, rank, world, device, mode, shards, model, core, opt, out, stop, MetricsLog(out, 0, enabled=False),
              base_lrs)  # fmt: skip
    resume(run)
    if cfg.cuda_graphs:  # after resume: the graphs hold the parameters' storage as it is from here on
        _check_graphs(cfg, mode)
        run.graphs = StepGraphs(core)
    run.log = MetricsLog(out, run.step, enabled=rank == 0)
    return run


def _distributed(cfg: TrainConfig) -> tuple[int, int, torch.device, str]:
    """(rank, world size, device, "none" | "ddp" | "fsdp"); a process group only under torchrun."""
    device = resolve_device(cfg.device)
    if "RANK" not in os.environ:
        if cfg.distributed in ("ddp", "fsdp"):
            raise ValueError(
                f"distributed={cfg.distributed} needs torchrun: torchrun --nproc_per_node N -m nestlearn.train"
            )
        return 0, 1, device, "none"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mode = "ddp" if cfg.distributed == "auto" else cfg.distributed
    return rank, world, device, mode if (world > 1 or mode == "fsdp") else "none"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        raise ValueError(f"device={name} but CUDA is not available (torch {torch.__version__}, {build}); use "
                         "device=cpu or device=auto")  # fmt: skip
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _check_writable(out: Path) -> None:
    """Fail now, not after the first steps of work, when `out` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to out={out} ({e.strerror or e}); choose a writable directory") from None


def _open_data(cfg: TrainConfig, rank: int) -> Shards:
    """The shards, their sizes and hashes verified (rank 0; a stamp makes repeated starts fast)."""
    shards = Shards(cfg.data)
    if rank == 0:
        report = shards.verify()
        how = f"{len(report['hashed'])} hashed in {report['seconds']:.1f} s" if report["hashed"] else "unchanged"
        print(f"data {cfg.data}: {report['tokens']:,} tokens in {len(report['files'])} files verified ({how})",
              flush=True)  # fmt: skip
    return shards


def _check_fits(cfg: TrainConfig, model_cfg: Any, shards: Shards) -> None:
    vocab = shards.meta["tokenizer"]["vocab_size"]
    if model_cfg.vocab_size < vocab:
        raise ValueError(
            f"model_overrides.vocab_size = {model_cfg.vocab_size} is smaller than the data's vocabulary ({vocab}, "
            f"tokenizer {shards.meta['tokenizer'].get('name')!r}); remove the override"
        )
    if model_cfg.variant in ("transformer", "hope_attention") and cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"seq_len = {cfg.seq_len} is longer than the model's max_seq_len = {model_cfg.max_seq_len}; lower "
            f"seq_len or set model_overrides.max_seq_len={cfg.seq_len}"
        )


def _check_fsdp(cfg: TrainConfig) -> None:
    if cfg.optimizer != "adamw":
        raise ValueError("FSDP shards every matrix across ranks; use optimizer=adamw with distributed=fsdp")


def _check_graphs(cfg: TrainConfig, mode: str) -> None:
    """`cuda_graphs=true` runs on one GPU without torch.compile (`models/graphs.py`; the model's own refusals follow
    in `StepGraphs`)."""
    if mode != "none":
        raise ValueError(f"cuda_graphs=true runs on one GPU; this run uses {mode.upper()}: set cuda_graphs=false")
    if cfg.compile:
        raise ValueError("cuda_graphs=true and compile=true exclude each other: set one of them false")


def prepare_compile(core: CausalLM) -> contextlib.AbstractContextManager[Any]:
    """The settings under which `torch.compile` of `core` compiles and runs (enter them for as long as the compiled
    model runs): with online CMS levels, AOTAutograd's buffer donation off (`torch._functorch.config.
    donated_buffer`), since their compiled backward runs twice for each learned segment, once for the inner
    gradient and once in the outer backward, and a backward that donated its saved buffers refuses the second call.
    The inner gradient itself compiles correctly since the online driver gives each block its fast weights from
    outside the block's graph (`CausalLM._differentiable`; docs/decisions.md). Refused: online levels with the full
    meta-gradient (`cms_meta_grad="full"`), whose inner gradient keeps its graph: a compiled backward cannot be
    differentiated again. Static-level models compile as they are."""
    if core.online_segment is None:
        return contextlib.nullcontext()
    if core.config.cms_meta_grad == "full":
        raise ValueError(
            "compile=true does not support online CMS levels with cms_meta_grad=full (a compiled backward cannot be "
            "differentiated again); use compile=false, or model_overrides.cms_meta_grad=first_order"
        )
    return torch._functorch.config.patch(donated_buffer=False)


def _shard(core: CausalLM) -> None:
    """FSDP2: one `fully_shard` unit per block and one at the root; a model with online CMS levels is one unit.

    Why one unit with online levels: the online driver runs every block once per segment and takes the inner
    gradient (`torch.autograd.grad`) inside the model's forward. A per-block unit hooks every block call: each
    inner gradient then fires the blocks' pre- and post-backward hooks and the root's final callback, which
    reshards the root's parameters (the embedding) in the middle of the forward ("mixed torch.Tensor and
    DTensor"), and every segment gathers every block again (14 all-gathers a step instead of 1 on a 2-block,
    2-segment model). As one unit the parameters are gathered once at the root's pre-forward and stay gathered
    (the root does not reshard after forward) until the outer backward's final callback reduce-scatters the
    gradients and reshards; no FSDP hook lies inside the forward. Parameters, gradients and optimizer states
    stay sharded between steps; during a step every rank holds the whole parameters and gradients."""
    from torch.distributed.fsdp import fully_shard

    if core.online_segment is None:
        for block in core.blocks:
            fully_shard(block)
    fully_shard(core)


# ---------------------------------------------------------------------------------------------
# the loop


def _loop(run: Run) -> None:
    cfg = run.cfg
    deadline = None if cfg.max_minutes is None else time.perf_counter() + 60 * cfg.max_minutes
    micro = cfg.batch_size // cfg.grad_accum
    if micro % run.world:
        raise ValueError(f"batch_size / grad_accum = {micro} is not divisible by the {run.world} processes")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_last, step_at_last = time.perf_counter(), run.step
    while run.step < cfg.steps:
        lr_scale = lr_factor(run.step, cfg)
        for g, base in zip(run.opt.param_groups, run.base_lrs, strict=True):
            g["lr"] = base * lr_scale
        result = _train_step(run, micro, deadline)
        run.step += 1
        _count_nonfinite(run, result)
        last = run.step == cfg.steps or result.out_of_time  # a run out of time ends logged and evaluated
        logged = run.step % cfg.log_every == 0 or last
        evaluated = logged and (run.step % cfg.eval_every == 0 or last)
        if logged:
            now = time.perf_counter()
            speed = (run.step - step_at_last) * tokens_per_step / max(now - t_last, 1e-9)
            t_last, step_at_last = now, run.step
            _write(run, result, lr_scale, speed, evaluated, (cfg.steps - run.step) * tokens_per_step / max(speed, 1))
        ending = result.signalled or result.out_of_time
        path = None
        if (run.step % cfg.ckpt_every == 0 or last or ending) and _may_save(run):
            path = save_checkpoint(run)
        if cfg.stop_at is not None and run.step >= cfg.stop_at:
            break  # as if the job had been killed here (tests, preemption drills)
        if ending:
            _say_stopped(run, result, path)
            break
    if run.rank == 0:
        run.log.plot(f"{cfg.variant} {cfg.model}")


def _train_step(run: Run, micro: int, deadline: float | None) -> StepResult:
    """One optimizer step: this rank's share of the step's global batch, in `grad_accum` micro-batches. The
    update is applied only when the loss and the gradient norm are finite."""
    cfg, model = run.cfg, run.model
    mine = run.shards.batch("train", run.step, cfg.batch_size, cfg.seq_len, cfg.seed, run.rank, run.world)
    total = torch.zeros((), device=run.device)
    for k, ids in enumerate(mine.to(run.device).split(micro // run.world)):
        sync = k == cfg.grad_accum - 1 or run.mode != "ddp"
        with model.no_sync() if not sync else contextlib.nullcontext(), _autocast(run):  # type: ignore[operator]
            logits = run.graphs.logits(ids[:, :-1]) if run.graphs is not None else model(ids[:, :-1])[0]
            loss = next_token_loss(logits, ids[:, 1:])
        (loss / cfg.grad_accum).backward()
        total += loss.detach() / cfg.grad_accum
    out_of_time = deadline is not None and time.perf_counter() > deadline
    flags = torch.tensor([run.stop.requested is not None, out_of_time], dtype=torch.float32, device=run.device)
    summary = torch.cat([total[None], flags])
    if run.world > 1:  # every rank takes the same decisions: the mean loss, any rank signalled or out of time
        dist.all_reduce(summary)
    norm = torch.nn.utils.clip_grad_norm_(run.core.parameters(), cfg.clip or math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
    loss_sum, signalled, timed_out, grad_norm = torch.cat([summary, norm.float()[None]]).tolist()  # one host sync
    loss_value = loss_sum / run.world
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if finite:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return StepResult(loss_value, grad_norm, finite, signalled > 0, timed_out > 0)


def _count_nonfinite(run: Run, result: StepResult) -> None:
    if result.finite:
        run.nonfinite_in_a_row = 0
        return
    run.nonfinite_total += 1
    run.nonfinite_in_a_row += 1
    n = run.nonfinite_in_a_row
    if run.rank == 0:
        print(f"step {run.step}: loss {result.loss:.4g}, gradient norm {result.grad_norm:.4g}: not finite, the "
              f"update is skipped ({n} in a row, {run.nonfinite_total} in all)", flush=True)  # fmt: skip
    if n >= run.cfg.max_nonfinite:
        raise TrainingDiverged(
            f"{n} non-finite steps in a row (steps {run.step - n + 1}-{run.step}): training has diverged. The newest "
            f"good checkpoint is {newest_name(run.out)}; resume from it with a lower learning rate, e.g. "
            f"lr={run.cfg.lr / 3:.3g} allow_changes=lr (now lr={run.cfg.lr}), or stronger clipping"
        )


def _may_save(run: Run) -> bool:
    """No checkpoint while the last step was not finite: the state that produced it is suspect."""
    if run.nonfinite_in_a_row and run.rank == 0:
        print(f"step {run.step}: no checkpoint (the last step was not finite); the newest stays "
              f"{newest_name(run.out)}", flush=True)  # fmt: skip
    return run.nonfinite_in_a_row == 0


def _write(run: Run, result: StepResult, lr_scale: float, speed: float, evaluated: bool, eta_s: float) -> None:
    record = {"step": run.step, "loss": finite_or_none(result.loss), "grad_norm": finite_or_none(result.grad_norm),
              "lr_scale": lr_scale, "tokens_per_s": speed, "tokens": run.step * run.cfg.batch_size * run.cfg.seq_len,
              "nonfinite_steps": run.nonfinite_total}  # fmt: skip
    if evaluated:
        record["val_loss"] = finite_or_none(evaluate(run))
    run.log.write(record, run.cfg.steps, eta_s)


def _say_stopped(run: Run, result: StepResult, path: Path | None) -> None:
    if run.rank == 0:
        why = f"stopped by {run.stop.requested}" if result.signalled else f"out of time ({run.cfg.max_minutes} min)"
        where = path or newest_name(run.out)
        print(f"{why} at step {run.step}/{run.cfg.steps}; checkpoint {where}; run the same command to continue",
              flush=True)  # fmt: skip


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean next-token loss on fixed windows of the validation split (the same windows every time)."""
    ids = run.shards.windows("val", run.cfg.eval_windows, run.cfg.seq_len).to(run.device)
    losses = []
    for row in ids.split(max(1, run.cfg.batch_size // run.cfg.grad_accum)):
        with _autocast(run):
            logits, _ = run.model(row[:, :-1])
        losses.append(next_token_loss(logits, row[:, 1:]))
    return float(torch.stack(losses).mean())


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base rates at `step`: linear warm-up, then cosine to `min_lr_ratio`, WSD (constant, then
    linear decay over the last `decay_fraction` of the steps) or constant."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = int(cfg.steps * (1 - cfg.decay_fraction))
        return 1.0 if step < start else 1.0 - (1.0 - lo) * (step - start) / max(1, cfg.steps - start)
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _autocast(run: Run) -> Any:
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=uses_bf16(run.cfg, run.device))


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a run of `cfg` on `device` trains under bf16 autocast (precision bf16, or auto on CUDA)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
