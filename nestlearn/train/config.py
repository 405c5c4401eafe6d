"""The training configuration: `TrainConfig` and `load_config` (YAML or Python file, then `key=value` overrides).

What this is: one typed dataclass whose fields are converted to their annotated types wherever they come from
(`lr=3e-3` on the command line and `lr: 3e-4` in YAML are floats; nestlearn/fields.py) and checked on
construction, each bad value a `ValueError` that names the field and the valid choices; `model_overrides` is
checked against `ModelConfig`'s fields (a typo is named, with the closest valid key). What it is not: the
training loop (`loop.py`) or the checks against a checkpoint on resume (`checkpoints.py`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..fields import coerce, coerce_fields
from ..models import ModelConfig
from ..models.config import RENAMED, VARIANTS
from ..models.presets import PRESETS, ablation_fields
from ..optim.routing import MATRIX_OPTIMIZERS

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", *MATRIX_OPTIMIZERS)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run needs; `batch_size` counts sequences per optimizer step over all ranks and micro-batches.

    Safety: `max_nonfinite` non-finite steps in a row (loss or gradient norm NaN / inf; each one skipped) stop the
    run. `allow_changes` names the fields that may differ from the checkpoint's when a run resumes (e.g.
    `("lr", "steps")`, or `("all",)`); any other difference is refused with every differing field named.
    Speed: `compile` (torch.compile; with online CMS levels AOTAutograd's buffer donation goes off) and
    `cuda_graphs` (every block call of a training step replayed as a CUDA graph, `models/graphs.py`: one GPU, no
    DDP / FSDP / compile / activation checkpointing; online CMS levels included).
    """

    data: str
    out: str = "runs/default"
    model: str = "20M"
    variant: str = "hope"
    ablation: str | None = None  # a row of the paper's Table 6 (HOPE): "w/o DGD", ... (models/presets.py)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    optimizer: str = "adamw"
    lr: float = 3e-4
    matrix_lr: float = 0.02
    weight_decay: float = 0.1
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup: int = 100
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_windows: int = 16
    ckpt_every: int = 200
    keep_last: int = 3
    max_nonfinite: int = 10
    allow_changes: tuple[str, ...] = ()
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    device: str = "auto"
    max_minutes: float | None = None
    stop_at: int | None = None

    def __post_init__(self) -> None:
        coerce_fields(self)
        _choice("model", self.model, tuple(PRESETS))
        _choice("variant", self.variant, VARIANTS)
        if self.ablation is not None:
            ablation_fields(self.ablation)  # a ValueError naming the rows
            if self.variant != "hope":
                raise ValueError(f"ablation={self.ablation!r} is a row of HOPE's Table 6; set variant=hope")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every", "ckpt_every",
                     "keep_last", "eval_windows", "max_nonfinite"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "matrix_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        _in_range("weight_decay", self.weight_decay, 0, math.inf)
        _in_range("clip", self.clip, 0, math.inf)
        _in_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        _in_range("decay_fraction", self.decay_fraction, 0, 1)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 (or null for no limit), got {self.max_minutes}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at must be >= 1 (or null), got {self.stop_at}")
        self.model_overrides = check_model_overrides(self.model_overrides)
        unknown = sorted(set(self.allow_changes) - {"all", *CHANGEABLE})
        if unknown:
            raise ValueError(f"allow_changes names {unknown}; valid names: all, {', '.join(CHANGEABLE)}")

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not meant."""
        out = []
        if self.warmup >= self.steps:
            out.append(
                f"warmup ({self.warmup}) >= steps ({self.steps}): the learning rate never reaches its peak; "
                f"lower warmup (e.g. warmup={max(1, self.steps // 20)})"
            )
        return out


# fields that a resumed run compares with its checkpoint (the rest - logging, paths, device - may change freely)
# ("data" is the data's identity - shard hashes and tokenizer -, "model" the resulting ModelConfig)
CHANGEABLE = ("data", "model", "seq_len", "batch_size", "steps", "optimizer", "lr", "matrix_lr", "weight_decay",
              "schedule", "warmup", "decay_fraction", "min_lr_ratio", "clip", "precision", "seed")  # fmt: skip


def check_model_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Each key a `ModelConfig` field (a typo is named with its closest match), each value of that field's type."""
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for key, value in overrides.items():
        if key in RENAMED:
            raise ValueError(
                f"model_overrides.{key} is now called {RENAMED[key]!r}; write model_overrides.{RENAMED[key]}"
            )
        if key not in hints or key == "variant":
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close and close[0] != "variant" else ""
            valid = ", ".join(k for k in hints if k != "variant")
            raise ValueError(f"model_overrides.{key} is not a model setting{hint}; valid keys: {valid}")
        out[key] = coerce(value, hints[key], f"model_overrides.{key}")
    return out


def load_config(path: str | None, overrides: list[str], *, need_data: bool = True) -> TrainConfig:
    """A YAML (`.yaml`/`.yml`) or Python (`.py` defining `config`) file, then `key=value` overrides (values
    parsed as YAML, then typed by their field; `model_overrides.<key>=value` sets one ModelConfig field).
    `need_data=False`: a config without `data` is taken (`nestlearn kernels`, which builds the model only)."""
    values: dict[str, Any] = {}
    if path:
        values = _read_config_file(Path(path))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. steps=500)")
        key, raw = item.split("=", 1)
        value = _parse_value(raw, key)
        if key.startswith("model_overrides."):
            values.setdefault("model_overrides", {})[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown config keys {unknown}{hint}; valid keys: {sorted(known)}")
    if "data" not in values:
        if need_data:
            raise ValueError("the config needs `data`: a directory made by `nestlearn data prepare`")
        values["data"] = ""
    return TrainConfig(**values)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
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


def _parse_value(raw: str, key: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"{key}: cannot read {raw!r} ({_yaml_problem(e)})") from None


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
