"""Train a small model of any variant on one synthetic task and score it per length bin.

What this is: `build_model` (a `SynthModel`: the `CausalLM` of a variant, plus MAD's decoder for a task read from
the last state), `train` (AdamW, seeded, warm-up then cosine, gradient clip), `evaluate` (token and sequence
accuracy per length bin), `train_run` / `eval_run` (the work behind `nestlearn synth train|eval`: checkpoint as
`model.safetensors` + `model.json` through `nestlearn.io.save_bundle`, a JSON report through
`nestlearn.eval.report.write_report`, a PNG of accuracy against length), and `table` (the printed result).
Progress goes to stderr. The default model is `tiny`: the debug preset shrunk to width 64, 2 blocks
(`SMALL`, the fields that apply to the variant), with a CMS level learning online every 16 tokens. On the 2-core
CPU (one thread, 32 rows of 32 tokens) a Transformer++ trains about 34 steps a second, HOPE about 2;
`nestlearn synth train --task parity --variant transformer --steps 200 --seq-len 16` takes seconds.
What it is not: the task generators (`tasks.py`, `formal.py`), the command line (`command.py`), or
`nestlearn train` (which trains language models on corpora).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ...io import load_bundle, save_bundle
from ...layers.basic import RMSNorm
from ...models import CausalLM, ModelConfig, next_token_loss, preset
from ...models.config import fields_for
from ...train import code_version
from ..report import progress, write_report
from . import make_task
from .tasks import Batch, Bin, Task, state_report

# the `tiny` size: the debug preset at width 64 and depth 2, memories in chunks of 16, a CMS level learning every
# 16 tokens, MAC segments of 32 (each variant takes the fields that apply to it)
SMALL: dict[str, Any] = dict(
    d_model=64, n_layers=2, n_heads=4, mlp_hidden=128, mem_chunk=16, proj_chunk=16, n_persistent=4, segment=32,
    cms_levels=(None, 16),
)  # fmt: skip
SIZES = ("tiny", "debug", "20M", "60M", "125M")
CHECKPOINT = "model"  # model.safetensors + model.json
KIND = "nestlearn.synth.checkpoint"
EVAL_SEED_OFFSET = 1_000_000  # evaluation data come from seed + this (never the training stream)


@dataclass
class Settings:
    """How a run trains and evaluates: `steps` AdamW steps (`lr` peak, `weight_decay`, gradient norm clipped to
    `clip`) of `batch` rows; `seed` seeds the weights, the training data and (offset) the test data; `bins`: test
    length bins (None = the task's own); `eval_batches`: batches of `batch` rows per bin."""

    steps: int = 200
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    eval_batches: int = 4
    bins: list[Bin] | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


# ---------------------------------------------------------------------------------------------
# the model


class Decoder(nn.Module):
    """MAD's compression decoder: the final state plus a sinusoidal embedding of each position, through a
    non-expanding two-layer GELU MLP and an unembedding. state `[B, d]` -> logits `[B, T, V]`."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [RMSNorm(dim), nn.Linear(dim, dim), nn.GELU(), RMSNorm(dim), nn.Linear(dim, dim)]
        self.mlp = nn.Sequential(*layers, nn.GELU(), RMSNorm(dim), nn.Linear(dim, vocab))

    def forward(self, state: Tensor, length: int) -> Tensor:
        return self.mlp(state[:, None, :] + sinusoids(length, state.shape[-1]).to(state))


def sinusoids(length: int, dim: int) -> Tensor:
    """Sine / cosine position embeddings. -> `[length, dim]` float32."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)[:, :dim]


class SynthModel(nn.Module):
    """A task's model: `lm` (CausalLM), and `decoder` for a task with `readout == "last"`.
    `forward(inputs [B, T]) -> logits [B, T, V]` in the task's target layout."""

    def __init__(self, config: ModelConfig, readout: str) -> None:
        super().__init__()
        self.lm = CausalLM(config)
        self.decoder = Decoder(config.d_model, config.vocab_size) if readout == "last" else None

    def forward(self, inputs: Tensor) -> Tensor:
        if self.decoder is None:
            return self.lm(inputs)[0]
        return self.decoder(last_hidden(self.lm, inputs), inputs.shape[1])


def last_hidden(lm: CausalLM, inputs: Tensor) -> Tensor:
    """The final-norm output at the last position `[B, d]` (caught from `lm.norm`: the last call of a forward
    pass, which an online CMS runs segment by segment, covers the last token)."""
    seen: list[Tensor] = []
    handle = lm.norm.register_forward_hook(lambda _m, _a, out: seen.append(out[:, -1]))
    try:
        lm(inputs)
    finally:
        handle.remove()
    return seen[-1]


def model_config(task: Task, variant: str, size: str = "tiny", overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The config of `size` for `variant` with the task's vocabulary; `overrides` (ModelConfig fields) last."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    base = fields_for(variant, SMALL) if size == "tiny" else {}
    fields = {**base, **(overrides or {}), "vocab_size": task.vocab_size}
    return preset("debug" if size == "tiny" else size, variant, **fields)


def build_model(task: Task, config: ModelConfig, seed: int) -> SynthModel:
    torch.manual_seed(seed)
    return SynthModel(config, task.readout)


# ---------------------------------------------------------------------------------------------
# training and scoring


def pick_length(task: Task, bin_: Bin, gen: torch.Generator) -> int:
    """A uniform admissible length of the bin."""
    check_bins(task, [bin_])
    lengths = task.admissible_lengths(*bin_)
    return lengths[int(torch.randint(len(lengths), (1,), generator=gen))]


def spread_lengths(task: Task, bin_: Bin, n: int) -> list[int]:
    """`n` admissible lengths of the bin spread evenly over it (each once before any twice)."""
    check_bins(task, [bin_])
    lengths = task.admissible_lengths(*bin_)
    if n >= len(lengths):
        return [lengths[i % len(lengths)] for i in range(n)]
    return [lengths[round((i + 0.5) * len(lengths) / n - 0.5)] for i in range(n)]


def check_bins(task: Task, bins: list[Bin]) -> None:
    """Refuse a bin without an admissible length (before any work is done)."""
    for bin_ in bins:
        if not task.admissible_lengths(*bin_):
            raise ValueError(f"no length in {label(bin_)} fits {task.name} ({task.length_rule()}); widen the bin")


def lr_scale(step: int, steps: int) -> float:
    """Linear warm-up over the first 10 % of the steps (at most 100), then cosine down to 0.1."""
    warm = max(1, min(100, steps // 10))
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))


def train(model: SynthModel, task: Task, s: Settings) -> dict[str, Any]:
    """`s.steps` AdamW steps on fresh batches of the training bin (data from `s.seed`). -> every step's loss,
    `final_loss` (the mean over the last tenth of the steps) and the seconds taken."""
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_scale(i, s.steps))
    model.train()
    losses, start, every = [], time.perf_counter(), max(1, s.steps // 10)
    for step in range(1, s.steps + 1):
        batch = task.sample(s.batch, pick_length(task, task.train_bin(), gen), gen)
        loss = next_token_loss(model(batch.inputs), batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"training diverged at step {step} (loss {losses[-1]}); lower --lr (now {s.lr})")
        opt.step()
        sched.step()
        if step % every == 0 or step == s.steps:
            progress(f"{task.name}: step {step}/{s.steps} loss {sum(losses[-every:]) / len(losses[-every:]):.4f}")
    return {"losses": losses, "final_loss": sum(losses[-every:]) / len(losses[-every:]),
            "seconds": time.perf_counter() - start}  # fmt: skip


class Score(NamedTuple):
    """Counts of one batch: right scored tokens, scored tokens, right sequences, sequences with a scored token."""

    right: int
    tokens: int
    right_rows: int
    rows: int


def score(predictions: Tensor, batch: Batch) -> Score:
    """Predicted ids `[B, T]` against the batch's targets at its mask; a row is right when every scored position
    is."""
    right = (predictions == batch.targets) & batch.mask
    has = batch.mask.any(dim=1)
    rows_right = (right | ~batch.mask).all(dim=1) & has
    return Score(int(right.sum()), int(batch.mask.sum()), int(rows_right.sum()), int(has.sum()))


@torch.no_grad()  # not inference_mode: an online CMS keeps learning from what it reads, which needs autograd
def evaluate(model: SynthModel, task: Task, bins: list[Bin], batches: int, batch: int, seed: int) -> list[dict]:
    """Accuracy per bin over `batches` batches of `batch` rows, at lengths spread evenly over the bin (a language
    with one string per length, such as a^n b^n, is thus scored on `batches` different lengths)."""
    gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    was_training = model.training
    model.eval()
    out = []
    for bin_ in bins:
        total, lengths = Score(0, 0, 0, 0), []
        for length in spread_lengths(task, bin_, batches):
            b = task.sample(batch, length, gen)
            total = Score(*(x + y for x, y in zip(total, score(model(b.inputs).argmax(-1), b), strict=True)))
            lengths.append(b.inputs.shape[1])
        out.append(bin_record(bin_, total, lengths))
        progress(f"{task.name}: {label(bin_)} token accuracy {out[-1]['token_accuracy']:.3f}")
    model.train(was_training)
    return out


def bin_record(bin_: Bin, s: Score, lengths: list[int]) -> dict[str, Any]:
    return {"bin": label(bin_), "lo": bin_[0], "hi": bin_[1], "mean_length": sum(lengths) / len(lengths),
            "token_accuracy": s.right / s.tokens, "sequence_accuracy": s.right_rows / s.rows,
            "scored_tokens": s.tokens, "sequences": s.rows}  # fmt: skip


def label(bin_: Bin) -> str:
    return str(bin_[0]) if bin_[0] == bin_[1] else f"{bin_[0]}-{bin_[1]}"


# ---------------------------------------------------------------------------------------------
# the runs behind `nestlearn synth train|eval`


def train_run(
    task: Task, variant: str, s: Settings, out: str | Path, *, size: str = "tiny", overrides: dict | None = None
) -> dict[str, Any]:
    """Train, save the checkpoint, evaluate, write `report.json` and `accuracy.png` into `out`. -> the report's
    numbers."""
    out, bins = Path(out), s.bins or task.test_bins()
    check_bins(task, bins)
    config = model_config(task, variant, size, overrides)
    model = build_model(task, config, s.seed)
    n = sum(p.numel() for p in model.parameters())
    progress(f"{task.name}: {variant} ({size}, {n:,} parameters), {s.steps} steps of {s.batch} rows, lr {s.lr}")
    trained = train(model, task, s)
    save_checkpoint(out, model, task, s, size)
    numbers = measure(model, task, bins, s.eval_batches, s.batch, s.seed)
    numbers.update(parameters=n, train=trained)
    report_config = {"task": task.name, "task_args": task.args(), "variant": variant, "size": size,
                     "model_overrides": overrides or {}, "model_config": config.to_dict(),
                     "settings": dataclasses.asdict(s), "out": str(out)}  # fmt: skip
    write_report(out / "report.json", f"synth.{task.name}", report_config, numbers, seed=s.seed)
    plot(numbers["bins"], task, out / "accuracy.png", f"{task.name}: {variant}, {s.steps} steps")
    return numbers


def eval_run(
    checkpoint: str | Path,
    *,
    task_args: dict[str, Any] | None = None,
    bins: list[Bin] | None = None,
    batches: int | None = None,
    seed: int | None = None,
    json_path: str | Path | None = None,
    expect_task: str | None = None,
) -> tuple[Task, dict[str, Any]]:
    """Evaluate a checkpoint of `train_run` (on its task; `task_args` change its parameters, not its vocabulary;
    `expect_task` is checked against the recorded task); writes `eval.json` and `eval.png` beside it (or at
    `json_path`). -> the task and the numbers."""
    checkpoint = Path(checkpoint)
    model, task, meta = load_checkpoint(checkpoint, task_args)
    if expect_task is not None and expect_task != task.name:
        raise ValueError(
            f"{checkpoint} was trained on {task.name}, not {expect_task}; pass --task {task.name} or leave --task out"
        )
    s = Settings(**{**meta["settings"], "bins": None})
    seed = s.seed if seed is None else seed
    bins = bins or ([tuple(b) for b in meta["settings"]["bins"]] if meta["settings"]["bins"] else task.test_bins())
    check_bins(task, bins)
    numbers = measure(model, task, bins, batches or s.eval_batches, s.batch, seed)
    json_path = Path(json_path) if json_path else checkpoint / "eval.json"
    cfg = {"checkpoint": str(checkpoint), "tensors_sha256": meta["tensors_sha256"], "task": task.name,
           "task_args": task.args(), "variant": meta["model_config"]["variant"], "trained": meta["settings"],
           "bins": [list(b) for b in bins]}  # fmt: skip
    write_report(json_path, f"synth.{task.name}", cfg, numbers, seed=seed)
    plot(numbers["bins"], task, json_path.with_suffix(".png"), f"{task.name}: {cfg['variant']} ({checkpoint.name})")
    return task, numbers


def measure(model: SynthModel, task: Task, bins: list[Bin], batches: int, batch: int, seed: int) -> dict[str, Any]:
    """Accuracy per bin, chance, and the model's state size after the longest training row."""
    start = time.perf_counter()
    per_bin = evaluate(model, task, bins, batches, batch, seed)
    return {"bins": per_bin, "headline": f"{task.headline}_accuracy", "chance": task.chance,
            "state": state_report(model.lm, task.train_bin()[1]),
            "eval_seconds": time.perf_counter() - start}  # fmt: skip


def save_checkpoint(out: Path, model: SynthModel, task: Task, s: Settings, size: str) -> Path:
    meta = {"kind": KIND, "task": task.name, "task_args": task.args(), "size": size,
            "model_config": model.lm.config.to_dict(), "settings": dataclasses.asdict(s),
            "code_version": code_version()}  # fmt: skip
    return save_bundle(out, CHECKPOINT, model.state_dict(), meta)


def load_checkpoint(directory: Path, task_args: dict[str, Any] | None = None) -> tuple[SynthModel, Task, dict]:
    """The model (eval mode), its task and the checkpoint's metadata."""
    if not (directory / f"{CHECKPOINT}.json").is_file():
        raise ValueError(f"{directory} holds no {CHECKPOINT}.json; give the --out directory of `nestlearn synth train`")
    tensors, meta = load_bundle(directory, CHECKPOINT)
    if meta.get("kind") != KIND:
        raise ValueError(f"{directory} holds {meta.get('kind')!r}, not a checkpoint of `nestlearn synth train`")
    task = make_task(meta["task"], **{**meta["task_args"], **(task_args or {})})
    config = ModelConfig.from_dict(meta["model_config"])
    if task.vocab_size != config.vocab_size:
        raise ValueError(
            f"these task settings need {task.vocab_size} token ids but the model has {config.vocab_size}; keep the "
            "task's vocabulary as it was trained"
        )
    model = SynthModel(config, task.readout)
    model.load_state_dict(tensors)
    return model.eval(), task, meta


# ---------------------------------------------------------------------------------------------
# output


def table(task: Task, numbers: dict[str, Any]) -> str:
    """The result as printed: one line per bin."""
    lines = [f"{task.name}: chance {task.chance:.3f} per token; headline {numbers['headline']}",
             f"  {'length':>9}  {'token acc':>9}  {'seq acc':>7}  {'scored':>7}"]  # fmt: skip
    for b in numbers["bins"]:
        lines.append(f"  {b['bin']:>9}  {b['token_accuracy']:9.3f}  {b['sequence_accuracy']:7.3f}  "
                     f"{b['scored_tokens']:7,d}")  # fmt: skip
    st = numbers["state"]
    lines.append(f"  state per sequence: {st['initial_bytes']:,} bytes at the start, {st['after_bytes']:,} after "
                 f"{st['after_tokens']} tokens ({st['note']})")  # fmt: skip
    return "\n".join(lines)


def plot(bins: list[dict], task: Task, path: Path, title: str) -> Path | None:
    """Accuracy (token and sequence) against the length bin, with chance; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the `plot` extra
        progress(f"matplotlib is not installed (pip install -e '.[plot]'); {path.name} not drawn")
        return None
    x = list(range(len(bins)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("token_accuracy", "o-"), ("sequence_accuracy", "s--")):
        ax.plot(x, [b[key] for b in bins], style, label=key.replace("_", " "))
    ax.axhline(task.chance, color="grey", linestyle=":", label="chance (token)")
    ax.set(xticks=x, xticklabels=[b["bin"] for b in bins], xlabel="length", ylabel="accuracy", ylim=(-0.02, 1.02),
           title=title)  # fmt: skip
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
