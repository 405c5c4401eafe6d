"""Checkpoints of a training run: written only from finite state, atomically; resumed from the newest intact one,
and only into the same run.

What this is: `save_checkpoint(run)` writes `out/checkpoints/step_XXXXXXX/` (model and optimizer bundles,
safetensors + JSON with the tensors' SHA-256, and `trainer.json`: step, config, model config, tokenizer and data
identity, code version) under a temporary name and renames it; it refuses non-finite weights or optimizer state
(`TrainingDiverged`), so a diverged run never replaces good checkpoints, and `keep_last` prunes only checkpoints
older than the one just written. `resume(run)` takes the newest checkpoint that reads back intact (hashes match,
every tensor finite), saying which damaged ones it passed over, then compares it with the run: tokenizer, data
(the shards' hashes), model configuration, optimizer and every field that changes the schedule or the batches.
Each difference is named; the run continues only when `allow_changes` lists it. What it is not: the training
loop, or the state of a model's memories (`models/state.py`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data.tokenizer import check_identity
from ..errors import first_line
from ..io import join_tree, load_bundle, save_bundle, split_tree
from ..models import ModelConfig
from ..models.config import NO_RESULT_FIELDS
from .config import CHANGEABLE
from .run import Run


class TrainingDiverged(RuntimeError):
    """The run cannot go on: its weights, optimizer state or losses are no longer finite."""

    exit_status = 3  # the command line's status for it (nestlearn/errors.py)


# ---------------------------------------------------------------------------------------------
# saving


def save_checkpoint(run: Run) -> Path | None:
    """Write the checkpoint of `run.step` (every rank calls this: FSDP2 gathers; rank 0 writes). -> its path."""
    if not states_finite(run):
        raise TrainingDiverged(
            f"step {run.step}: the weights or optimizer state hold NaN or inf; nothing was saved, the newest good "
            f"checkpoint is {newest_name(run.out)}. Lower lr (now {run.cfg.lr}) or clip and resume from it"
        )
    model_state = _full_model_state(run)
    opt_tensors, opt_meta = split_tree(_full_optimizer_state(run), "opt")
    if run.rank != 0:
        return None
    root = run.out / "checkpoints"
    final, tmp = root / f"step_{run.step:07d}", root / f".tmp_step_{run.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"kind": "nestlearn.checkpoint", "step": run.step, "config": _jsonable(dataclasses.asdict(run.cfg)),
            "model_config": run.core.config.to_dict(), "tokenizer": run.shards.meta["tokenizer"],
            "data": data_identity(run.shards.meta), "nonfinite_steps": run.nonfinite_total,
            "code_version": code_version()}  # fmt: skip
    try:
        save_bundle(tmp, "model", model_state, {"kind": "nestlearn.model", **meta})
        save_bundle(tmp, "optimizer", opt_tensors, {"kind": "nestlearn.optimizer", "structure": opt_meta})
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    shutil.rmtree(final, ignore_errors=True)  # a damaged checkpoint of the same step, passed over on resume
    tmp.rename(final)
    older = [p for p in checkpoint_dirs(root) if _step(p) < run.step]  # never a newer (damaged) one, never this one
    for old in older[: max(0, len(older) - (run.cfg.keep_last - 1))]:
        shutil.rmtree(old)
    return final


def states_finite(run: Run) -> bool:
    """Whether every weight and optimizer tensor is finite, agreed by all ranks (one host sync)."""
    tensors = [_local(p) for p in run.core.parameters()]
    for state in _optimizer_states(run.opt):
        tensors += [_local(t) for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    flag = torch.stack([t.isfinite().all().to(run.device) for t in tensors]).all().float()
    if run.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def newest_name(out: Path) -> str:
    found = checkpoint_dirs(out / "checkpoints")
    return str(found[-1]) if found else "(none yet)"


# ---------------------------------------------------------------------------------------------
# resuming


def resume(run: Run) -> None:
    """Continue from the newest intact checkpoint in `out/checkpoints`, if any (see the module docstring)."""
    root = run.out / "checkpoints"
    candidates = checkpoint_dirs(root)
    for path in reversed(candidates):
        try:
            tensors, meta, opt_state = read_checkpoint(path)
        except (ValueError, OSError, KeyError) as e:
            _say(run, f"checkpoint {path} is damaged and passed over ({first_line(e)})")
            continue
        if path != candidates[-1]:
            _say(run, f"resuming from {path}, the newest intact checkpoint")
        changed = _check_same_run(run, path, meta)
        _load(run, path, tensors, None if "optimizer" in changed else opt_state)
        run.step, run.nonfinite_total = meta["step"], meta.get("nonfinite_steps", 0)
        _say(run, f"resumed from {path} (step {run.step})")
        return
    if candidates:
        raise ValueError(
            f"every checkpoint in {root} is damaged ({len(candidates)} tried); delete {root} to start over, or "
            "choose a new out directory"
        )


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """A checkpoint's model weights, metadata and optimizer state; ValueError if anything is torn or non-finite."""
    tensors, meta = load_bundle(path, "model")
    opt_tensors, opt_meta = load_bundle(path, "optimizer")
    for what, group in (("weights", tensors), ("optimizer state", opt_tensors)):
        bad = [k for k, t in group.items() if t.is_floating_point() and not bool(t.isfinite().all())]
        if bad:
            raise ValueError(f"its {what} hold NaN or inf ({bad[0]} and {len(bad) - 1} more)")
    return tensors, meta, join_tree(opt_tensors, opt_meta["structure"])


def _check_same_run(run: Run, path: Path, meta: dict[str, Any]) -> set[str]:
    """The names of the fields that differ from the checkpoint's (all allowed); ValueError naming the others."""
    check_identity(meta["tokenizer"], run.shards.meta["tokenizer"], f"checkpoint {path}")
    diffs = differences(meta, run)
    allowed = set(CHANGEABLE) if "all" in run.cfg.allow_changes else set(run.cfg.allow_changes)
    refused = sorted(set(diffs) - allowed)
    if refused:
        raise ValueError(
            f"this run differs from checkpoint {path}: " + "; ".join(diffs[k] for k in sorted(diffs)) + ". A "
            f"resumed run would not continue the same training; to go on with the new values pass "
            f"allow_changes={','.join(refused)}, or choose a new out directory"
        )
    if diffs:
        _say(run, "resuming with changed settings (allowed): " + "; ".join(diffs[k] for k in sorted(diffs)))
    if "optimizer" in diffs:
        _say(run, "the optimizer changed: its state starts fresh")
    return set(diffs)


def differences(meta: dict[str, Any], run: Run) -> dict[str, str]:
    """`{field: description}` for every compared field whose value differs from the checkpoint's."""
    then, now = meta.get("config", {}), _jsonable(dataclasses.asdict(run.cfg))
    out = {
        name: f"{name} {then.get(name)!r} in the checkpoint, {now[name]!r} now"
        for name in CHANGEABLE
        if name not in ("data", "model") and name in then and then[name] != now[name]
    }
    old_model = _jsonable(ModelConfig.from_dict(meta["model_config"]).to_dict())  # also under earlier field names
    new_model = _jsonable(run.core.config.to_dict())
    fields = [k for k in sorted(set(old_model) | set(new_model))
              if k not in NO_RESULT_FIELDS and old_model.get(k) != new_model.get(k)]  # fmt: skip
    if fields:
        out["model"] = "model " + ", ".join(f"{k} {old_model.get(k)!r} -> {new_model.get(k)!r}" for k in fields)
    old_data, new_data = meta.get("data"), data_identity(run.shards.meta)
    if old_data is not None and old_data != new_data:
        files = sorted(k for k in set(old_data["files"]) | set(new_data["files"])
                       if old_data["files"].get(k) != new_data["files"].get(k))  # fmt: skip
        out["data"] = f"data {run.cfg.data}: {', '.join(files)} differ from the checkpoint's (SHA-256)"
    return out


def data_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies a prepared dataset: every token file's SHA-256."""
    return {"files": {name: info["sha256"] for name, info in meta["files"].items()}}


def _load(run: Run, path: Path, model: dict[str, torch.Tensor], optimizer: Any) -> None:
    """Weights (and optimizer state unless None) into the run; the run's own hyper-parameters stay in force."""
    own = [{k: v for k, v in g.items() if k != "params"} for g in run.opt.param_groups]
    try:
        _load_states(run, model, optimizer)
    except (RuntimeError, KeyError) as e:
        raise ValueError(
            f"the weights in {path} do not fit this model ({first_line(e)}); choose a new out directory"
        ) from None
    for g, hyper in zip(run.opt.param_groups, own, strict=True):
        g.update(hyper)


def _say(run: Run, message: str) -> None:
    if run.rank == 0:
        print(message, flush=True)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def _jsonable(x: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so saved and current values compare equal."""
    return json.loads(json.dumps(x))


# ---------------------------------------------------------------------------------------------
# full (gathered) states under FSDP2


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard under FSDP2


def _optimizer_states(opt: Any) -> list[dict[str, Any]]:
    optimizers = getattr(opt, "optimizers", [opt])
    return [s for o in optimizers if o is not None for s in o.state.values()]


def _full_model_state(run: Run) -> dict[str, torch.Tensor]:
    """Unsharded weights (a collective under FSDP2: every rank calls it; rank 0 receives them)."""
    if run.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(run.core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return dict(run.core.state_dict())


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
        if optimizer is not None:
            set_optimizer_state_dict(run.core, run.opt.optimizers[0], optimizer["0"], options=opts)
        return
    run.core.load_state_dict(model)
    if optimizer is not None:
        run.opt.load_state_dict(optimizer)


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
