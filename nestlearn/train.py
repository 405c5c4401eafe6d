"""`nestlearn train`: train any model of the family on prepared shards, on one device or with torchrun.

What this is: `TrainConfig` (typed; from Python or YAML files plus `key=value` overrides, `load_config`),
`train(cfg)` and `main()` (the CLI; also `torchrun --nproc_per_node N -m nestlearn.train ...`). Per step: the
step's global batch, drawn by step index from the shards and split into `grad_accum` micro-batches (so a
resumed, distributed or accumulating run sees the same sequences); bf16 autocast on CUDA; optional
`torch.compile`; gradient clipping; the optimizer chosen by name (`nestlearn.optim.route`: AdamW or a deep
optimizer on the hidden matrices); cosine / WSD / constant schedules with warm-up. It logs JSONL metrics,
TensorBoard scalars (when tensorboard is installed) and a loss-curve PNG, prints a progress line (loss,
tokens/s, ETA), and writes checkpoints (safetensors + JSON, each a directory written under a temporary name and
renamed; the last `keep_last` kept) from which a restart continues exactly. Every run records its config,
tokenizer identity and code version. Distributed: DDP or FSDP2 (`fully_shard`); each rank owns its sequences,
their memory states and online CMS updates (the state never crosses ranks).
What it is not: data preparation (`nestlearn data prepare`) or evaluation suites.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .data.shards import Shards
from .data.tokenizer import check_identity
from .io import load_bundle, save_bundle
from .models import CausalLM, ModelConfig, preset
from .optim import route

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run needs; `batch_size` counts sequences per optimizer step over all ranks and micro-batches."""

    data: str
    out: str = "runs/default"
    model: str = "20M"
    variant: str = "hope"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    optimizer: str = "adamw"
    lr: float = 3e-4
    matrix_lr: float = 0.02
    weight_decay: float = 0.1
    schedule: str = "cosine"
    warmup: int = 100
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_windows: int = 16
    ckpt_every: int = 200
    keep_last: int = 3
    distributed: str = "auto"
    device: str = "auto"
    max_minutes: float | None = None
    stop_at: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every", "ckpt_every",
                     "keep_last", "eval_windows"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"distributed must be 'auto', 'none', 'ddp' or 'fsdp', got {self.distributed!r}")


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """A YAML (`.yaml`/`.yml`) or Python (`.py` defining `config`) file, then `key=value` overrides (values
    parsed as YAML; `model_overrides.<key>=value` sets one ModelConfig field)."""
    values: dict[str, Any] = {}
    if path:
        values = _read_config_file(Path(path))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = _parse_value(raw)
        if key.startswith("model_overrides."):
            values.setdefault("model_overrides", {})[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
    if "data" not in values:
        raise ValueError("the config needs `data`: a directory made by `nestlearn data prepare`")
    return TrainConfig(**values)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
    elif path.suffix == ".py":
        scope: dict[str, Any] = {}
        exec(compile(path.read_text(), str(path), "exec"), scope)  # a config file the user wrote and runs
        data = scope.get("config")
        data = dataclasses.asdict(data) if isinstance(data, TrainConfig) else data
    else:
        raise ValueError(f"config file {path} must be .yaml, .yml or .py")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must define a mapping (YAML) or `config` (Python)")
    return data


def _parse_value(raw: str) -> Any:
    import yaml

    return yaml.safe_load(raw)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Run:
    """What one process of a run holds."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    mode: str
    shards: Shards
    model: torch.nn.Module
    core: CausalLM
    opt: Any
    out: Path
    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    base_lrs: list[float] = field(default_factory=list)


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Run (or resume) training; returns the metric records written to `metrics.jsonl` (rank 0)."""
    run = _setup(cfg)
    try:
        _loop(run)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return run.log


def _setup(cfg: TrainConfig) -> Run:
    rank, world, device, mode = _distributed(cfg)
    shards = Shards(cfg.data)
    vocab = shards.meta["tokenizer"]["vocab_size"]
    model_cfg = preset(cfg.model, cfg.variant, vocab_size=vocab, **cfg.model_overrides)
    torch.manual_seed(cfg.seed)
    core = CausalLM(model_cfg).to(device)
    out = Path(cfg.out)
    model: torch.nn.Module = core
    if mode == "ddp":
        ids = [device.index] if device.index is not None else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)
    elif mode == "fsdp":
        if cfg.optimizer != "adamw":
            raise ValueError("FSDP shards every matrix across ranks; use optimizer=adamw with distributed=fsdp")
        if core.online is not None:
            raise ValueError(
                "online CMS levels under FSDP2 are not supported yet (the inner gradient runs inside the sharded "
                "forward); use distributed=ddp, or static levels (model_overrides.cms_online_layers=[])"
            )
        from torch.distributed.fsdp import fully_shard

        for block in core.blocks:
            fully_shard(block)
        fully_shard(core)
    if cfg.compile:
        model = torch.compile(model)
    opt = route(core, cfg.optimizer, lr=cfg.matrix_lr, adamw_lr=cfg.lr, weight_decay=cfg.weight_decay,
                adamw_kwargs={"betas": (0.9, 0.95)})  # fmt: skip
    run = Run(cfg, rank, world, device, mode, shards, model, core, opt, out)
    run.base_lrs = [g["lr"] for g in opt.param_groups]  # before a resume overwrites them with scaled rates
    _resume(run)
    return run


def _distributed(cfg: TrainConfig) -> tuple[int, int, torch.device, str]:
    """(rank, world size, device, "none" | "ddp" | "fsdp"); a process group only under torchrun."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
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


def _loop(run: Run) -> None:
    cfg, start_time = run.cfg, time.perf_counter()
    micro = cfg.batch_size // cfg.grad_accum
    if micro % run.world:
        raise ValueError(f"batch_size / grad_accum = {micro} is not divisible by the {run.world} processes")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_last, step_at_last = time.perf_counter(), run.step
    while run.step < cfg.steps:
        lr_scale = lr_factor(run.step, cfg)
        for g, base in zip(run.opt.param_groups, run.base_lrs, strict=True):
            g["lr"] = base * lr_scale
        loss = _train_step(run, micro)
        run.step += 1
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            now = time.perf_counter()
            speed = (run.step - step_at_last) * tokens_per_step / max(now - t_last, 1e-9)
            t_last, step_at_last = now, run.step
            record = {"step": run.step, "loss": loss, "lr_scale": lr_scale, "tokens_per_s": speed,
                      "tokens": run.step * tokens_per_step}  # fmt: skip
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                record["val_loss"] = evaluate(run)
            _record(run, record, (cfg.steps - run.step) * tokens_per_step / max(speed, 1e-9))
        if run.step % cfg.ckpt_every == 0 or run.step == cfg.steps:
            save_checkpoint(run)
        if cfg.stop_at is not None and run.step >= cfg.stop_at:
            break  # as if the job had been killed here (tests, preemption drills)
        if cfg.max_minutes is not None and time.perf_counter() - start_time > 60 * cfg.max_minutes:
            logged = run.step % cfg.log_every == 0 or run.step == cfg.steps
            if not (logged and (run.step % cfg.eval_every == 0 or run.step == cfg.steps)):  # same on every rank
                _record(run, {"step": run.step, "loss": loss, "lr_scale": lr_scale, "tokens_per_s": 0.0,
                              "tokens": run.step * tokens_per_step, "val_loss": evaluate(run)}, 0.0)  # fmt: skip
            save_checkpoint(run)
            break  # out of time: the run ends evaluated and checkpointed
    if run.rank == 0:
        _finish(run)


def _train_step(run: Run, micro: int) -> float:
    """One optimizer step: this rank's share of the step's global batch, in `grad_accum` micro-batches."""
    cfg, model = run.cfg, run.model
    mine = run.shards.batch("train", run.step, cfg.batch_size, cfg.seq_len, cfg.seed, run.rank, run.world)
    total = torch.zeros((), device=run.device)
    for k, ids in enumerate(mine.to(run.device).split(micro // run.world)):
        sync = k == cfg.grad_accum - 1 or run.mode != "ddp"
        ctx = model.no_sync() if not sync else _null()  # type: ignore[operator]
        with ctx, _autocast(run):
            logits, _ = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        (loss / cfg.grad_accum).backward()
        total += loss.detach() / cfg.grad_accum
    if cfg.clip:
        torch.nn.utils.clip_grad_norm_(run.core.parameters(), cfg.clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return float(total)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean next-token loss on fixed windows of the validation split (the same windows every time)."""
    ids = run.shards.windows("val", run.cfg.eval_windows, run.cfg.seq_len).to(run.device)
    losses = []
    for row in ids.split(max(1, run.cfg.batch_size // run.cfg.grad_accum)):
        with _autocast(run):
            logits, _ = run.model(row[:, :-1])
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), row[:, 1:].flatten()))
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
    bf16 = run.cfg.precision == "bf16" or (run.cfg.precision == "auto" and run.device.type == "cuda")
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _record(run: Run, record: dict[str, Any], eta_s: float) -> None:
    if run.rank != 0:
        return
    run.log.append(record)
    run.out.mkdir(parents=True, exist_ok=True)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    _tensorboard(run, record)
    val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
    print(f"step {record['step']:6d}/{run.cfg.steps} loss {record['loss']:.4f}{val} "
          f"{record['tokens_per_s']:,.0f} tok/s ETA {eta_s / 60:.1f} min", flush=True)  # fmt: skip


def _tensorboard(run: Run, record: dict[str, Any]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (the `train` extra)
        return
    writer = getattr(run, "_tb", None) or SummaryWriter(str(run.out / "tensorboard"))
    run._tb = writer  # type: ignore[attr-defined]
    for key in ("loss", "val_loss", "tokens_per_s", "lr_scale"):
        if key in record:
            writer.add_scalar(key, record[key], record["step"])
    writer.flush()


def _finish(run: Run) -> None:
    records = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="next-token loss", title=f"{run.cfg.variant} {run.cfg.model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.out / "loss.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(run: Run) -> None:
    """`out/checkpoints/step_XXXXXXX/` with model and optimizer bundles and `trainer.json`; atomic; keep-last-N."""
    model_state = _full_model_state(run)
    opt_tensors, opt_meta = _flatten_optimizer(_full_optimizer_state(run))
    if run.rank != 0:
        return
    root = run.out / "checkpoints"
    final = root / f"step_{run.step:07d}"
    tmp = root / f".tmp_step_{run.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"kind": "nestlearn.checkpoint", "step": run.step, "config": dataclasses.asdict(run.cfg),
            "model_config": run.core.config.to_dict(), "tokenizer": run.shards.meta["tokenizer"],
            "code_version": code_version()}  # fmt: skip
    try:
        save_bundle(tmp, "model", model_state, {"kind": "nestlearn.model", **meta})
        save_bundle(tmp, "optimizer", opt_tensors, {"kind": "nestlearn.optimizer", "structure": opt_meta})
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[: -run.cfg.keep_last]:
        shutil.rmtree(old)


def _full_model_state(run: Run) -> dict[str, torch.Tensor]:
    """Unsharded weights (a collective under FSDP2: every rank calls it; rank 0 receives them)."""
    if run.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(run.core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in run.core.state_dict().items()}


def _full_optimizer_state(run: Run) -> Any:
    if run.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"0": get_optimizer_state_dict(run.core, run.opt.optimizers[0], options=opts)}
    return run.opt.state_dict()


def _load_states(run: Run, model: dict[str, torch.Tensor], optimizer: Any) -> None:
    if run.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(run.core, model, options=opts)
        set_optimizer_state_dict(run.core, run.opt.optimizers[0], optimizer["0"], options=opts)
        return
    run.core.load_state_dict(model)
    run.opt.load_state_dict(optimizer)


def _resume(run: Run) -> None:
    """Continue from the newest complete checkpoint in `out/checkpoints`, if any."""
    root = run.out / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    if not done:
        return
    path = done[-1]
    tensors, meta = load_bundle(path, "model")
    check_identity(meta["tokenizer"], run.shards.meta["tokenizer"], f"checkpoint {path}")
    if ModelConfig.from_dict(meta["model_config"]) != run.core.config:
        raise ValueError(f"checkpoint {path} holds another model configuration; use a new `out` directory")
    opt_tensors, opt_meta = load_bundle(path, "optimizer")
    _load_states(run, tensors, _unflatten_optimizer(opt_tensors, opt_meta["structure"]))
    run.step = meta["step"]
    if run.rank == 0:
        print(f"resumed from {path} (step {run.step})", flush=True)


def _flatten_optimizer(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a (nested) optimizer state_dict into tensors (by dotted path) and a JSON structure."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, dict):
            return {"__dict__": [[_key(k), walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, list | tuple):
            items = [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
            return {"__list__" if isinstance(x, list) else "__tuple__": items}
        return x

    return tensors, walk(state, prefix or "opt")


def _key(k: Any) -> Any:
    return {"__int__": k} if isinstance(k, int) else k


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: Any) -> Any:
    def build(x: Any) -> Any:
        if isinstance(x, dict) and "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if isinstance(x, dict) and "__dict__" in x:
            return {(k["__int__"] if isinstance(k, dict) else k): build(v) for k, v in x["__dict__"]}
        if isinstance(x, dict) and "__list__" in x:
            return [build(v) for v in x["__list__"]]
        if isinstance(x, dict) and "__tuple__" in x:
            return tuple(build(v) for v in x["__tuple__"])
        return x

    return build(structure)


def code_version() -> str:
    """The git commit of the code (with "+dirty" for uncommitted changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True)  # fmt: skip
    except FileNotFoundError:
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="nestlearn train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", default=None, help="a .yaml/.yml or .py config file")
    p.add_argument("overrides", nargs="*", help="key=value (e.g. data=prepared/shakespeare steps=500)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        sys.exit(f"nestlearn train: {e}")
    train(cfg)


if __name__ == "__main__":
    main()
