"""`nestlearn eval lm`: loss, perplexity and bits per byte of a trained model on the validation split and every
held-out source, over fixed windows and over whole documents read through the learning state.

What this is: two ways of scoring, both summing `models.next_token_loss` (reduction "sum") in float64:
- windows: `Shards.windows(split, N, L)`, the same evenly spaced windows the trainer evaluates on, each read
  from the initial state in batches; every window scores its L next-token pairs;
- documents: N documents of the split (evenly spaced by index), each read from the initial state chunk by chunk
  with the state passed on (`stream_nats`), so a recurrent model is scored at its true context length: the
  document's end-of-text separator comes first, then every text token and the closing separator are predicted.
  A full-attention model (Transformer++, Hope-Attention) cannot read past `max_seq_len`: a longer document is
  scored in consecutive pieces of `max_seq_len` tokens with `model.forget_context` between them (Hope-Attention
  keeps what its CMS learned, Transformer++ starts afresh); the report counts these documents (`cut`).
Metrics from the totals: loss = nats / tokens, perplexity = exp(loss), bits per byte = nats / ln 2 / bytes,
where bytes counts the UTF-8 bytes of the decoded scored tokens (separators decode to nothing). The online CMS
levels learn while reading unless `--no-learn`. Validation documents are also scored per source (the split
holds each source's documents in order, `meta.json` counts them).
What it is not: training-time evaluation (`train.loop.evaluate`), or long-context retrieval tasks
(`eval/longctx.py`, `eval/synth/`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.shards import Shards
from ..data.tokenizer import Tokenizer
from ..models import CausalLM, next_token_loss
from ..models.config import FULL_ATTENTION
from ..train.checkpoints import data_identity
from ..train.loop import resolve_device
from .load import Loaded, load_run
from .report import progress, write_report

MODES = ("windows", "documents")


@dataclass
class Totals:
    """Summed next-token loss (nats) over `tokens` predictions whose text is `bytes` UTF-8 bytes long."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    count: int = 0  # windows or documents
    cut: int = 0  # documents scored in pieces (full attention, longer than max_seq_len)

    def add(self, other: Totals) -> None:
        self.nats += other.nats
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.count += other.count
        self.cut += other.cut

    def metrics(self) -> dict[str, Any]:
        loss = self.nats / self.tokens if self.tokens else math.nan
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if not loss >= 700 else math.inf,  # NaN stays NaN
            "bits_per_byte": self.nats / math.log(2) / self.bytes if self.bytes else math.nan,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nats": self.nats,
            "count": self.count,
            "cut": self.cut,
        }


# ---------------------------------------------------------------------------------------------
# scoring


def max_context(model: CausalLM) -> int | None:
    """The longest context the model can read in one state: `max_seq_len` for full attention, else None."""
    cfg = model.config
    return cfg.max_seq_len if cfg.variant in FULL_ATTENTION else None


@torch.no_grad()
def stream_nats(
    model: CausalLM, inputs: Tensor, targets: Tensor, chunk: int, *, learn: bool = True, max_len: int | None = None
) -> Tensor:
    """Summed next-token loss (0-dim float64) of `targets` `[B, T]` given `inputs` `[B, T]` (the token before
    each target), read from the initial state in pieces of at most `chunk` tokens with the state passed on.
    With `max_len`, no piece crosses a multiple of `max_len` and the context is forgotten there
    (`model.forget_context`)."""
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    state, t, T = None, 0, inputs.shape[1]
    while t < T:
        position = 0 if state is None else state.position
        room = chunk if max_len is None else min(chunk, max_len - position)
        if room == 0:
            state = model.forget_context(state)
            continue
        n = min(room, T - t)
        logits, state = model(inputs[:, t : t + n], state, learn=learn)
        total += next_token_loss(logits, targets[:, t : t + n], reduction="sum").double()
        t += n
    return total


@torch.no_grad()
def score_windows(
    model: CausalLM, tokenizer: Tokenizer, windows: Tensor, *, batch_size: int = 8, learn: bool = True
) -> Totals:
    """windows `[N, L + 1]` (int64): each read from the initial state; its L next-token pairs are scored."""
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    for rows in windows.to(model.device).split(batch_size):
        logits, _ = model(rows[:, :-1], learn=learn)
        total += next_token_loss(logits, rows[:, 1:], reduction="sum").double()
    n_bytes = sum(text_bytes(tokenizer, row[1:].tolist()) for row in windows)
    return Totals(float(total), windows.shape[0] * (windows.shape[1] - 1), n_bytes, windows.shape[0])


def score_document(model: CausalLM, tokenizer: Tokenizer, doc: list[int], *, chunk: int, learn: bool = True) -> Totals:
    """One document's text ids (without separators): read `[eot] + doc`, predict `doc + [eot]`."""
    eot = tokenizer.eot
    ids = torch.tensor([[eot, *doc, eot]], dtype=torch.long, device=model.device)
    max_len = max_context(model)
    nats = stream_nats(model, ids[:, :-1], ids[:, 1:], chunk, learn=learn, max_len=max_len)
    cut = int(max_len is not None and len(doc) + 1 > max_len)
    return Totals(float(nats), len(doc) + 1, text_bytes(tokenizer, doc), 1, cut)


def text_bytes(tokenizer: Tokenizer, ids: list[int]) -> int:
    """UTF-8 bytes of the decoded text of `ids`, end-of-text separators left out."""
    return len(tokenizer.decode([i for i in ids if i != tokenizer.eot]).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# the dataset side


def open_data(loaded: Loaded, data: str | None) -> Shards:
    """The prepared dataset to score on (default: the run's training data), checked against the tokenizer."""
    path = data or loaded.info["train_config"].get("data")
    if path is None:
        raise ValueError(f"{loaded.checkpoint} does not record its training data; pass --data DIR")
    if not Path(path).is_dir():
        where = "given" if data else "recorded in the checkpoint"
        raise ValueError(f"the data directory {path} ({where}) does not exist; pass --data DIR of a prepared dataset")
    shards = Shards(path)
    shards.check_tokenizer(loaded.tokenizer.identity)
    shards.verify()
    if loaded.info.get("data") not in (None, data_identity(shards.meta)):
        progress(f"note: {path} is not the data this run was trained on (its files' SHA-256 differ)")
    return shards


def eval_splits(shards: Shards, wanted: list[str] | None, window_len: int | None = None) -> list[str]:
    """The validation split and every held-out source, or the splits asked for; each checked to exist and, with
    `window_len`, to hold one window."""
    have = [name.removesuffix(".bin") for name in shards.meta["files"]]
    splits = wanted or [s for s in have if s == "val" or s.startswith("heldout_")]
    for split in splits:
        if split not in have:
            raise ValueError(f"{shards.dir} has no split {split!r}; it has {', '.join(have)}")
        n = shards.meta["files"][f"{split}.bin"]["tokens"]
        if window_len is not None and n <= window_len + 1:
            raise ValueError(f"split {split!r} has {n} tokens, fewer than one window of {window_len + 1}; pass a "
                             "shorter --window-len or --windows 0")  # fmt: skip
    return splits


def documents(shards: Shards, split: str, count: int) -> list[tuple[int, np.ndarray]]:
    """Up to `count` documents of `split`, evenly spaced by index: (index, text ids without the separator)."""
    data = shards.tokens(split)
    starts = np.load(shards.dir / f"{split}.docs.npy")
    if count <= 0 or starts.size == 0:
        return []
    ends = np.append(starts[1:], data.size)
    picked = np.unique(np.linspace(0, starts.size - 1, min(count, starts.size)).round().astype(np.int64))
    return [(int(i), np.asarray(data[starts[i] : ends[i] - 1], dtype=np.int64)) for i in picked]


def doc_sources(shards: Shards, split: str) -> list[str] | None:
    """The source of every document of `split`, in order (None when `meta.json` cannot say)."""
    sources = shards.meta.get("sources", {})
    if split.startswith("heldout_"):
        name = split.removeprefix("heldout_")
        return [name] * sources.get(name, {}).get("docs", 0)
    key = {"val": "docs_val", "train": "docs_train"}.get(split)
    names = [n for n, st in sources.items() if key in st for _ in range(st[key])] if key else []
    return names if len(names) == shards.meta["files"][f"{split}.bin"]["docs"] else None


# ---------------------------------------------------------------------------------------------
# the command


def evaluate_split(loaded: Loaded, shards: Shards, split: str, args: argparse.Namespace) -> dict[str, Any]:
    """`{"windows": metrics, "documents": metrics (+ "by_source")}` of one split."""
    model, tok, out = loaded.model, loaded.tokenizer, {}
    if args.windows > 0:
        windows = shards.windows(split, args.windows, args.window_len)
        out["windows"] = score_windows(model, tok, windows, batch_size=args.batch_size, learn=args.learn).metrics()
        progress(f"{split}: {windows.shape[0]} windows of {args.window_len}: loss {out['windows']['loss']:.4f}")
    if args.documents > 0:
        out["documents"] = _score_documents(loaded, shards, split, args)
    return out


def _score_documents(loaded: Loaded, shards: Shards, split: str, args: argparse.Namespace) -> dict[str, Any]:
    docs, sources = documents(shards, split, args.documents), doc_sources(shards, split)
    total, by_source = Totals(), {}
    for k, (index, doc) in enumerate(docs):
        t = score_document(loaded.model, loaded.tokenizer, doc.tolist(), chunk=args.chunk, learn=args.learn)
        total.add(t)
        if sources is not None:
            by_source.setdefault(sources[index], Totals()).add(t)
        progress(f"{split}: document {k + 1}/{len(docs)} ({t.tokens:,} tokens{', cut' if t.cut else ''}): "
                 f"{t.nats / t.tokens:.4f} nats/token")  # fmt: skip
    result = total.metrics()
    if split == "val" and len(by_source) > 1:
        result["by_source"] = {name: t.metrics() for name, t in by_source.items()}
    return result


def command(args: argparse.Namespace) -> None:
    """`nestlearn eval lm` (see the module docstring); prints a table, writes the report with --json."""
    loaded = load_run(args.run, resolve_device(args.device), tokenizer=args.tokenizer)
    _defaults(loaded, args)
    shards = open_data(loaded, args.data)
    splits = eval_splits(shards, args.split, args.window_len if args.windows else None)
    progress(f"{loaded.checkpoint} (step {loaded.step}, {loaded.info['variant']}) on {shards.dir}")
    numbers = {split: evaluate_split(loaded, shards, split, args) for split in splits}
    print(table(numbers))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "debug")}
        write_report(args.json, "lm", {**config, "data": str(shards.dir)}, numbers, loaded)
        progress(f"report written to {args.json}")


def _defaults(loaded: Loaded, args: argparse.Namespace) -> None:
    """Window length (the run's seq_len) and chunk (the window length) when not given; both checked."""
    if args.window_len is None:
        args.window_len = int(loaded.info["train_config"].get("seq_len", 512))
    args.chunk = args.window_len if args.chunk is None else args.chunk
    limit = max_context(loaded.model)
    for flag, value in (("--window-len", args.window_len), ("--chunk", args.chunk)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
        if limit is not None and value > limit:
            raise ValueError(f"{flag} {value} is longer than this model's max_seq_len ({limit}); pass {limit} or less")
    if args.windows < 0 or args.documents < 0 or args.batch_size < 1:
        raise ValueError("--windows and --documents must be >= 0 (0 skips that mode) and --batch-size >= 1")


def table(numbers: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    rows = [f"{'split':<24} {'mode':<10} {'count':>6} {'tokens':>12} {'bytes':>12} {'loss':>8} {'ppl':>10} "
            f"{'bits/byte':>9}"]  # fmt: skip
    for split, modes in numbers.items():
        for mode, m in modes.items():
            rows.append(_row(split, mode, m))
            rows += [_row(f"  {name}", mode, sub) for name, sub in m.get("by_source", {}).items()]
    return "\n".join(rows)


def _row(name: str, mode: str, m: dict[str, Any]) -> str:
    return (f"{name:<24} {mode:<10} {m['count']:>6} {m['tokens']:>12,} {m['bytes']:>12,} {m['loss']:>8.4f} "
            f"{m['perplexity']:>10.3f} {m['bits_per_byte']:>9.4f}")  # fmt: skip
