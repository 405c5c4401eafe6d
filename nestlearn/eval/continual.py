"""`nestlearn eval continual`: two continual-learning protocols, their result matrices and standard metrics, for a
trained run or a tiny fresh model, comparing online CMS levels with the same weights' static levels and a
Transformer++.

What this is: a protocol presents T tasks in order and, after learning task i, measures every task j, filling
`R[i, j]` (`R` `[T, T]`, float64; `run_matrix`). Rows are "after task i", columns "on task j"; the diagonal is
measured right after its task is learned, the lower triangle is what remains of earlier tasks, the upper triangle
is the zero-shot score of tasks not yet seen (reported, used by no metric). Metrics (`continual_metrics`; Lopez-Paz
& Ranzato 2017, Chaudhry et al. 2018), with j over the tasks before the last (j = 0 .. T-2; the last task has
nothing after it to transfer to or forget from):

    average      = mean_j R[T-1, j]                                  (all T tasks, after the last)
    BWT          = mean_{j<T-1} (R[T-1, j] - R[j, j])                (backward transfer; < 0 = forgotten)
    forgetting   = mean_{j<T-1} (max_{i<T-1} R[i, j] - R[T-1, j])    (best earlier score minus the final one)

For a loss (lower is better) the same definitions are applied to -R, so a positive BWT is still an improvement and
a positive forgetting still a loss of what was known: BWT = mean (L[j, j] - L[T-1, j]), forgetting =
mean (L[T-1, j] - min_{i<T-1} L[i, j]); the average stays the mean final loss. With one task BWT and forgetting
are undefined (NaN; the command asks for at least two).

The protocols:
- class-incremental text classification (`class_incremental`): sources are classes, grouped into tasks of
  `--classes-per-task` classes in order. An example is a text (`--text-len` tokens cut from its source) and its
  label, the source's name; the model reads `<eot> text => label<eot>` and classifies by the summed log-likelihood
  of " label" + end-of-text after `<eot> text =>` (no new head: the label is text). A task's test texts are
  classified among every class seen so far (`--candidates seen`, the default: the classes of tasks 0 .. max(i, j),
  chance 1 / their count), or among all classes of the protocol from the start (`--candidates all`). With "seen"
  the candidate set grows, so even a model that keeps nothing loses accuracy on early tasks (the static and
  Transformer++ rows show how much); with "all" such a model has equal rows, BWT = forgetting = 0.
- domain-incremental LM stream (`domain_incremental`): sources are domains read one after another (the first
  `--learn-tokens` tokens of each); after each, `R[i, j]` is the mean next-token loss (nats per token) on `--windows`
  held-out windows of `--window-len` tokens of domain j.
Learning a task (`--mode`):
- `train`: `--steps` AdamW steps (lr `--lr`, no weight decay, gradient norm clipped at 1, a fresh optimizer per
  task) on batches of `--batch-size` rows drawn from the task's material, every row read from the initial state:
  classification rows are single examples whose loss counts on the label tokens and the closing end-of-text only;
  LM rows are the non-overlapping windows of the domain's learn tokens, every next token counted. The outer
  weights change; online CMS levels (if any) learn inside each row as the model always does.
- `context`: the outer weights are frozen (no optimizer exists; they stay bitwise equal) and the model only
  reads the task: its examples joined into one context (`<eot> text => label` after one another), or the domain's
  tokens, `--chunk` tokens per call with the state passed on, each task a new context (`forget_context` before
  it; a full-attention model also forgets at every `max_seq_len` tokens). Online CMS levels learn from the
  next-token loss of what they read (the paper's test-time continual learning); whatever persists is the CMS
  state, so static levels and a Transformer++ keep nothing and their rows are all equal.
Measuring: every test row is read from the initial state (train mode) or from the learned state with the context
forgotten (context mode: `forget_context` keeps only what the CMS learned), with the model's default reading
(online levels learn inside the row); nothing read while measuring persists.
Variants (`--variants`): `online` (the model as given), `static` (the same weights with `cms_online_layers=()`,
built by `dataclasses.replace` on the model's config: every CMS level static) and, for `--tiny` only, any family
variant (`transformer`, `hope_attention`, ...: a fresh tiny model of that variant from the same seed). Each
variant starts from its own copy of its initial weights. Models: a trained run (`load_run`) or `--tiny VARIANT`
(the debug preset at width 64, 2 blocks, a CMS level learning every 16 tokens: `synth.run.SMALL`). Data: a
prepared dataset (`--data DIR`: its sources, `--sources` to pick; a training source learns from its train-split
documents and is tested on its validation documents, a held-out source is cut at 80 % of its tokens; documents
are joined without separators) or, without `--data`, `--synthetic N` sources s0 .. s(N-1), each writing words of
2-5 letters drawn uniformly from its own 4 letters (s0: a-d, s1: e-h, ...), which a model learns in a few steps.
Output: a table on stdout, progress on stderr, the report (`write_report`, kind "continual") with `--json`, and a
PNG of every matrix (`--png`, or beside the report; matplotlib imported when drawing).
What it is not: a continual-learning method (no replay, no regularisation), a trainer of runs (`nestlearn train`)
or a benchmark of published numbers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from ..data.shards import Shards
from ..data.tokenizer import ByteTokenizer, Tokenizer, check_identity, get_tokenizer
from ..models import CausalLM, ModelState, next_token_loss, preset
from ..models.config import VARIANTS, fields_for
from ..train.loop import resolve_device
from .lm import doc_sources, max_context
from .report import progress, write_report
from .synth.run import SMALL

PROTOCOLS = ("class", "domain")
MODES = ("train", "context")
CANDIDATES = ("seen", "all")
SEPARATOR = " =>"
LETTERS = "abcdefghijklmnopqrstuvwx"  # six synthetic alphabets of four letters
ALPHABET = 4
HELD_OUT_LEARN = 0.8  # a held-out source learns from its first 80 % of tokens and is tested on the rest

Example = tuple[np.ndarray, str]  # (text ids [L] int64, label)


# ---------------------------------------------------------------------------------------------
# metrics and the protocol loop


def continual_metrics(R: np.ndarray | Sequence[Sequence[float]], *, lower_is_better: bool = False) -> dict[str, Any]:
    """Average, BWT and forgetting of a result matrix `R` `[T, T]` (module docstring), plus each earlier task's
    forgetting `[T-1]`. `lower_is_better` (a loss) applies the definitions to -R."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"a result matrix is square [T, T] with T >= 1, got shape {R.shape}")
    S = -R if lower_is_better else R
    final, T = S[-1], R.shape[0]
    per_task = S[:-1, :-1].max(axis=0) - final[:-1] if T > 1 else np.zeros(0)
    bwt = float(np.mean(final[:-1] - np.diag(S)[:-1])) if T > 1 else math.nan
    return {"average": float(R[-1].mean()), "bwt": bwt, "forgetting": float(per_task.mean()) if T > 1 else math.nan,
            "forgetting_per_task": per_task.tolist()}  # fmt: skip


def run_matrix(
    n: int, learn: Callable[[int], None], measure: Callable[[int, int], float], name: str = "protocol"
) -> np.ndarray:
    """Learn tasks 0 .. n-1 in order; right after learning task i, `R[i, j] = measure(i, j)` for every j.
    -> R `[n, n]` float64."""
    R = np.full((n, n), math.nan)
    for i in range(n):
        start = time.perf_counter()
        learn(i)
        R[i] = [measure(i, j) for j in range(n)]
        progress(f"{name}: after task {i + 1}/{n} ({time.perf_counter() - start:.1f} s): "
                 f"{' '.join(f'{x:.3f}' for x in R[i])}")  # fmt: skip
    return R


# ---------------------------------------------------------------------------------------------
# data: sources, classification tasks, domains


@dataclass(frozen=True)
class Source:
    """One class or domain: its name and two token streams `learn`, `test` (`[n]` int64, no separators)."""

    name: str
    learn: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class ClassTask:
    """One task of the class-incremental protocol: its classes, the examples it teaches and those it is tested
    on (each text `[text_len]`)."""

    classes: tuple[str, ...]
    learn: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class Domain:
    """One domain of the LM stream: `learn` `[n]` (the tokens read or trained on), `test` `[N, L + 1]` windows."""

    name: str
    learn: np.ndarray
    test: np.ndarray


def synthetic_sources(tokenizer: Tokenizer, n: int = 4, *, chars: int = 6000, seed: int = 0) -> list[Source]:
    """`n` sources s0 .. s(n-1) (at most 6): words of 2-5 letters drawn uniformly from the source's own four letters,
    `chars` characters to learn from and `chars // 2` to test on, drawn independently."""
    if not 2 <= n <= len(LETTERS) // ALPHABET:
        raise ValueError(f"--synthetic takes 2 to {len(LETTERS) // ALPHABET} sources, got {n}")
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        letters = LETTERS[ALPHABET * k : ALPHABET * (k + 1)]
        learn, test = (_encode(tokenizer, _words(rng, letters, c)) for c in (chars, chars // 2))
        out.append(Source(f"s{k}", learn, test))
    return out


def _words(rng: np.random.Generator, letters: str, chars: int) -> str:
    words, size = [], 0
    while size < chars:
        words.append("".join(rng.choice(list(letters), size=int(rng.integers(2, 6)))))
        size += len(words[-1]) + 1
    return " ".join(words)


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def dataset_sources(shards: Shards, names: Sequence[str] | None = None) -> list[Source]:
    """The sources of a prepared dataset (all, in `meta.json` order, or `names`): a training source learns from its
    train-split documents and is tested on its validation documents; a held-out source is cut at
    `HELD_OUT_LEARN` of its tokens."""
    have = list(shards.meta.get("sources", {}))
    names = list(names or have)
    if unknown := [n for n in names if n not in have]:
        raise ValueError(f"{shards.dir} has no source {', '.join(unknown)}; it has {', '.join(have) or 'none'}")
    out = []
    for name in names:
        if shards.meta["sources"][name].get("held_out"):
            tokens = _source_tokens(shards, f"heldout_{name}", name)
            cut = int(tokens.size * HELD_OUT_LEARN)
            out.append(Source(name, tokens[:cut], tokens[cut:]))
        else:
            out.append(Source(name, _source_tokens(shards, "train", name), _source_tokens(shards, "val", name)))
    return out


def _source_tokens(shards: Shards, split: str, name: str) -> np.ndarray:
    """The documents of `split` that come from source `name`, joined without their separators. -> `[n]` int64."""
    sources = doc_sources(shards, split)
    if sources is None:
        raise ValueError(f"{shards.dir}/meta.json does not say which source each {split} document comes from; "
                         "prepare the dataset again with `nestlearn data prepare`")  # fmt: skip
    data = shards.tokens(split)
    starts = np.load(shards.dir / f"{split}.docs.npy")
    ends = np.append(starts[1:], data.size)
    picked = [(a, b) for a, b, s in zip(starts, ends, sources, strict=True) if s == name]
    parts = [np.asarray(data[a : b - 1], dtype=np.int64) for a, b in picked]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def snippets(stream: np.ndarray, n: int, length: int, what: str) -> np.ndarray:
    """`n` non-overlapping, evenly spaced pieces of `length` tokens. -> `[n, length]` int64."""
    if stream.size < n * length:
        raise ValueError(f"{what} has {stream.size:,} tokens, fewer than {n} pieces of {length}; lower the "
                         "counts (--examples, --test-examples, --windows) or --text-len / --window-len")  # fmt: skip
    starts = np.linspace(0, stream.size - length, n).round().astype(np.int64)
    return np.stack([stream[s : s + length] for s in starts]).astype(np.int64)


def class_tasks(sources: Sequence[Source], per_task: int, examples: int, tests: int, text_len: int) -> list[ClassTask]:
    """Sources in groups of `per_task` (the last group may be smaller); every class gives `examples` texts to learn
    from and `tests` to be tested on. A task's examples alternate between its classes."""
    tasks = []
    for k in range(0, len(sources), per_task):
        group = sources[k : k + per_task]
        learn = [snippets(s.learn, examples, text_len, f"source {s.name} (learn part)") for s in group]
        test = [snippets(s.test, tests, text_len, f"source {s.name} (test part)") for s in group]
        tasks.append(ClassTask(tuple(s.name for s in group), _interleave(learn, group), _interleave(test, group)))
    return tasks


def _interleave(texts: list[np.ndarray], group: Sequence[Source]) -> list[Example]:
    return [(t[i], s.name) for i in range(texts[0].shape[0]) for t, s in zip(texts, group, strict=True)]


def domains(sources: Sequence[Source], learn_tokens: int, windows: int, window_len: int) -> list[Domain]:
    """Each source as a domain: its first `learn_tokens` learn tokens, `windows` test windows of `window_len + 1`."""
    out = []
    for s in sources:
        if s.learn.size < window_len + 1:
            raise ValueError(f"source {s.name} has {s.learn.size:,} tokens to learn from, fewer than one window of "
                             f"{window_len + 1}; lower --window-len")  # fmt: skip
        test = snippets(s.test, windows, window_len + 1, f"source {s.name} (test part)")
        out.append(Domain(s.name, s.learn[:learn_tokens], test))
    return out


# ---------------------------------------------------------------------------------------------
# the protocols


class Classifier(Protocol):
    """What the class-incremental protocol drives: learn a task's examples; pick a label per text."""

    def learn(self, examples: Sequence[Example]) -> None: ...
    def predict(self, texts: np.ndarray, candidates: Sequence[str]) -> list[str]: ...


class StreamLearner(Protocol):
    """What the LM stream drives: learn a domain's tokens `[n]`; mean next-token loss of windows `[N, L + 1]`."""

    def learn_stream(self, tokens: np.ndarray) -> None: ...
    def loss(self, windows: np.ndarray) -> float: ...


def class_incremental(
    learner: Classifier, tasks: Sequence[ClassTask], name: str = "class", *, candidates: str = "seen"
) -> np.ndarray:
    """Accuracy matrix `[T, T]`: after learning task i, the accuracy on task j's test texts among the classes of
    tasks 0 .. max(i, j) (`candidates="seen"`) or of every task ("all")."""
    if candidates not in CANDIDATES:
        raise ValueError(f"unknown --candidates {candidates!r}; choose {' or '.join(CANDIDATES)}")

    def measure(i: int, j: int) -> float:
        texts = np.stack([x for x, _ in tasks[j].test])
        picked = learner.predict(texts, seen_classes(tasks, max(i, j) if candidates == "seen" else len(tasks) - 1))
        return float(np.mean([p == y for p, (_, y) in zip(picked, tasks[j].test, strict=True)]))

    return run_matrix(len(tasks), lambda i: learner.learn(tasks[i].learn), measure, name)


def seen_classes(tasks: Sequence[ClassTask], last: int) -> list[str]:
    """The candidate labels once tasks 0 .. last are known."""
    return [c for t in tasks[: last + 1] for c in t.classes]


def domain_incremental(learner: StreamLearner, stream: Sequence[Domain], name: str = "domain") -> np.ndarray:
    """Loss matrix `[T, T]`: after learning domain i, the mean next-token loss on domain j's test windows."""
    return run_matrix(
        len(stream), lambda i: learner.learn_stream(stream[i].learn), lambda i, j: learner.loss(stream[j].test), name
    )


# ---------------------------------------------------------------------------------------------
# a model as the learner of both protocols


@dataclass
class Settings:
    """How a model learns and reads: `mode` ("train" or "context"); train mode's `steps`, `batch_size` (also the
    rows per scoring call), `lr`; `chunk` tokens per call when reading a context; `seed` of the batch draws;
    `window_len`, the length of train mode's LM rows."""

    mode: str = "context"
    steps: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    chunk: int = 512
    seed: int = 0
    window_len: int = 64

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose {' or '.join(MODES)}")
        for name in ("steps", "batch_size", "chunk", "window_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


class Rows(NamedTuple):
    """Training rows: `ids` `[N, L]` (int64, padded with end-of-text) and `targets` `[N, L]` (the next token
    where the loss counts, -100 elsewhere)."""

    ids: Tensor
    targets: Tensor


class ModelLearner:
    """A `CausalLM` under one `Settings`: the `Classifier` and `StreamLearner` of the protocols. In context mode
    `state` holds what was read (None before the first task)."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, settings: Settings) -> None:
        self.model, self.tok, self.s = model.eval(), tokenizer, settings
        self.state: ModelState | None = None
        self.tasks_learned = 0

    # learning -----------------------------------------------------------------------------------

    def learn(self, examples: Sequence[Example]) -> None:
        """Train on the examples (label loss only) or read them as one context."""
        seqs = [[self.tok.eot, *x.tolist(), *self.tok.encode(SEPARATOR), *self.label_ids(y)] for x, y in examples]
        if self.s.mode == "context":
            self._read(np.asarray([t for seq in seqs for t in seq[:-1]] + [self.tok.eot], dtype=np.int64))
        else:
            self._train(_label_rows(seqs, [len(self.label_ids(y)) for _, y in examples], self.tok.eot))

    def learn_stream(self, tokens: np.ndarray) -> None:
        """Train on the non-overlapping windows of `tokens` `[n]` (every next token) or read them as one context."""
        if self.s.mode == "context":
            self._read(tokens)
            return
        L = min(self.s.window_len, tokens.size - 1)
        w = torch.from_numpy(tokens.astype(np.int64))
        starts = range(0, w.numel() - L, L)
        rows = Rows(torch.stack([w[k : k + L] for k in starts]), torch.stack([w[k + 1 : k + L + 1] for k in starts]))
        self._train(rows)

    def _train(self, rows: Rows) -> None:
        gen = torch.Generator().manual_seed(self.s.seed * 1_000_003 + self.tasks_learned)
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.s.lr, weight_decay=0.0)
        self.model.train()
        for step in range(self.s.steps):
            pick = torch.randint(rows.ids.shape[0], (self.s.batch_size,), generator=gen)
            logits, _ = self.model(rows.ids[pick].to(self.model.device))
            loss = next_token_loss(logits, rows.targets[pick].to(self.model.device))
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged at step {step + 1} of task {self.tasks_learned + 1} (loss "
                                   f"{loss.item()}); lower --lr (now {self.s.lr})")  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            opt.step()
        self.model.eval()
        self.tasks_learned += 1

    @torch.no_grad()  # not inference_mode: the online CMS differentiates what it reads
    def _read(self, tokens: np.ndarray) -> None:
        """Read `tokens` `[n]` as a new context from the learned state, `chunk` tokens per call."""
        model, limit = self.model, max_context(self.model)
        state = None if self.state is None else model.forget_context(self.state)
        ids, t = torch.as_tensor(tokens, dtype=torch.long, device=model.device)[None], 0
        while t < ids.shape[1]:
            position = 0 if state is None else state.position
            room = self.s.chunk if limit is None else min(self.s.chunk, limit - position)
            if room == 0:
                state = model.forget_context(state)  # type: ignore[arg-type]
                continue
            piece = ids[:, t : t + room]
            _, state = model(piece, state)
            t += piece.shape[1]
        self.state = state
        self.tasks_learned += 1

    # measuring ----------------------------------------------------------------------------------

    def label_ids(self, label: str) -> list[int]:
        """What a label is scored as: " label" and the closing end-of-text."""
        return [*self.tok.encode(f" {label}"), self.tok.eot]

    def predict(self, texts: np.ndarray, candidates: Sequence[str]) -> list[str]:
        """texts `[N, L]` -> for each, the candidate of highest summed log-likelihood (ties: the first listed)."""
        return [candidates[k] for k in self.label_scores(texts, candidates).argmax(dim=1).tolist()]

    @torch.no_grad()
    def label_scores(self, texts: np.ndarray, candidates: Sequence[str]) -> Tensor:
        """texts `[N, L]` -> `[N, C]` float64: log P(" label" + end-of-text | `<eot> text =>`) of every candidate.
        The prompt is read once from the start state; each label continues from the state after it."""
        n = texts.shape[0]
        prompts = torch.cat([torch.full((n, 1), self.tok.eot), torch.from_numpy(texts).long(),
                             torch.tensor(self.tok.encode(SEPARATOR)).expand(n, -1)], dim=1)  # fmt: skip
        out = []
        for rows in prompts.to(self.model.device).split(self.s.batch_size):
            logits, state = self.model(rows, self._start(rows.shape[0]))
            first = logits[:, -1].double().log_softmax(-1)  # [b, V]: the label's first token
            out.append(torch.stack([self._label_logprob(first, state, self.label_ids(c)) for c in candidates], 1))
        return torch.cat(out).cpu()

    def _label_logprob(self, first: Tensor, state: ModelState, label: list[int]) -> Tensor:
        """first `[b, V]` (log-probabilities after the prompt), the state after it, label ids `[K]` -> `[b]`."""
        ids = torch.tensor(label, device=first.device).expand(first.shape[0], -1)
        logits, _ = self.model(ids[:, :-1], state)
        rest = logits.double().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
        return first[:, label[0]] + rest

    @torch.no_grad()
    def loss(self, windows: np.ndarray) -> float:
        """Mean next-token loss (nats per token) of windows `[N, L + 1]`, each read from the start state."""
        w = torch.from_numpy(windows).to(self.model.device)
        total = 0.0
        for rows in w.split(self.s.batch_size):
            logits, _ = self.model(rows[:, :-1], self._start(rows.shape[0]))
            total += float(next_token_loss(logits, rows[:, 1:], reduction="sum"))
        return total / (w.shape[0] * (w.shape[1] - 1))

    def _start(self, n: int) -> ModelState | None:
        """Where a measured row starts: the initial state (None), or in context mode the learned state with the
        context forgotten, repeated for `n` rows."""
        if self.state is None:
            return None
        return repeat_state(self.model.forget_context(self.state), n)


def _label_rows(seqs: list[list[int]], label_lens: list[int], pad: int) -> Rows:
    """Examples `<eot> text => label<eot>` as rows whose loss counts on the label and its end-of-text only."""
    L = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    targets = torch.full((len(seqs), L), -100, dtype=torch.long)
    for r, (seq, k) in enumerate(zip(seqs, label_lens, strict=True)):
        ids[r, : len(seq) - 1] = torch.tensor(seq[:-1])
        targets[r, len(seq) - 1 - k : len(seq) - 1] = torch.tensor(seq[-k:])
    return Rows(ids, targets)


def repeat_state(state: Any, n: int) -> Any:
    """A state of batch 1 repeated for `n` sequences (every tensor `[1, ...]` -> `[n, ...]`, copied)."""
    if isinstance(state, Tensor):
        return state.expand(n, *state.shape[1:]).clone()
    if isinstance(state, tuple):
        items = [repeat_state(x, n) for x in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    return state


# ---------------------------------------------------------------------------------------------
# variants


def tiny_model(variant: str, vocab_size: int, seed: int) -> CausalLM:
    """A fresh tiny model (`synth.run.SMALL`: width 64, 2 blocks, a CMS level learning every 16 tokens)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for --tiny; choose one of {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    return CausalLM(preset("debug", variant, **fields_for(variant, SMALL), vocab_size=vocab_size))


def default_variants(base: CausalLM, tiny: bool) -> list[str]:
    """online; static where the model has online CMS levels; a Transformer++ beside a tiny model of another variant."""
    names = ["online"] + (["static"] if base.online_blocks else [])
    return names + (["transformer"] if tiny and base.config.variant != "transformer" else [])


def build_variants(base: CausalLM, names: Sequence[str], *, tiny: bool, seed: int) -> dict[str, CausalLM]:
    """`{label: model}`: "online" (a copy of `base`), "static" (the same weights, `cms_online_layers=()`), or
    (tiny only) a family variant built fresh from `seed`."""
    out: dict[str, CausalLM] = {}
    for name in names:
        label, model = _variant(base, name, tiny=tiny, seed=seed)
        if label in out:
            raise ValueError(f"--variants lists {label} twice ({', '.join(names)}); list each model once")
        out[label] = model.to(base.device).eval()
    return out


def _variant(base: CausalLM, name: str, *, tiny: bool, seed: int) -> tuple[str, CausalLM]:
    cfg = base.config
    if name == "online":
        return cfg.variant, copy.deepcopy(base)
    if name == "static":
        if not base.online_blocks:
            raise ValueError(f"--variants static: this {cfg.variant} model has no online CMS levels to make static; "
                             "leave static out")  # fmt: skip
        static = CausalLM(dataclasses.replace(cfg, cms_online_layers=()))
        static.load_state_dict(base.state_dict())
        return f"{cfg.variant}-static", static
    if name in VARIANTS and tiny:
        return name, tiny_model(name, cfg.vocab_size, seed)
    if name in VARIANTS:
        raise ValueError(f"--variants {name}: a trained run has one set of weights (online or static); evaluate a "
                         f"{name} run with the same flags instead")  # fmt: skip
    raise ValueError(f"unknown variant {name!r} in --variants; choose online, static or (with --tiny) one of "
                     f"{', '.join(VARIANTS)}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# running both protocols over the variants


class Plan(NamedTuple):
    """The protocols' material: the classification tasks and the domain stream (None when not asked for)."""

    tasks: list[ClassTask] | None
    stream: list[Domain] | None


def plan(sources: Sequence[Source], args: argparse.Namespace) -> Plan:
    """Cut the sources into the material of every protocol of `args.protocols` (sizes checked here)."""
    tasks = stream = None
    if "class" in args.protocols:
        tasks = class_tasks(sources, args.classes_per_task, args.examples, args.test_examples, args.text_len)
    if "domain" in args.protocols:
        stream = domains(sources, args.learn_tokens, args.windows, args.window_len)
    return Plan(tasks, stream)


def evaluate(
    models: dict[str, CausalLM], tokenizer: Tokenizer, material: Plan, args: argparse.Namespace
) -> dict[str, Any]:
    """Every planned protocol for every model. -> the report's numbers."""
    numbers: dict[str, Any] = {}
    if material.tasks is not None:
        numbers["class"] = _run_class(models, tokenizer, material.tasks, args)
    if material.stream is not None:
        numbers["domain"] = _run_domain(models, tokenizer, material.stream, args)
    return numbers


def _run_class(models: dict[str, CausalLM], tok: Tokenizer, tasks: list[ClassTask], args: argparse.Namespace) -> dict:
    T = len(tasks)
    last = (lambda i, j: max(i, j)) if args.candidates == "seen" else (lambda i, j: T - 1)
    chance = [[1 / len(seen_classes(tasks, last(i, j))) for j in range(T)] for i in range(T)]
    out: dict[str, Any] = {"metric": "accuracy", "tasks": [list(t.classes) for t in tasks], "chance": chance,
                           "variants": {}}  # fmt: skip
    for label, model in models.items():
        start = time.perf_counter()
        R = class_incremental(make_learner(model, tok, args), tasks, f"class/{args.mode}/{label}",
                              candidates=args.candidates)  # fmt: skip
        out["variants"][label] = {"matrix": R.tolist(), **continual_metrics(R),
                                  "seconds": time.perf_counter() - start}  # fmt: skip
    return out


def _run_domain(models: dict[str, CausalLM], tok: Tokenizer, stream: list[Domain], args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {"metric": "loss", "domains": [d.name for d in stream],
                           "learn_tokens": [int(d.learn.size) for d in stream], "variants": {}}  # fmt: skip
    for label, model in models.items():
        start = time.perf_counter()
        R = domain_incremental(make_learner(model, tok, args), stream, f"domain/{args.mode}/{label}")
        out["variants"][label] = {"matrix": R.tolist(), **continual_metrics(R, lower_is_better=True),
                                  "seconds": time.perf_counter() - start}  # fmt: skip
    return out


def make_learner(model: CausalLM, tok: Tokenizer, args: argparse.Namespace) -> ModelLearner:
    """A learner on a copy of the model (train mode changes its weights; each protocol starts from the same)."""
    settings = Settings(args.mode, args.steps, args.batch_size, args.lr, args.chunk, args.seed, args.window_len)
    return ModelLearner(copy.deepcopy(model) if args.mode == "train" else model, tok, settings)


# ---------------------------------------------------------------------------------------------
# the command


def register(subparsers: Any) -> None:
    """Add `continual` to the `nestlearn eval` subparsers."""
    p = subparsers.add_parser(
        "continual", help="continual learning: class-incremental classification and a domain-incremental LM stream",
        description="Continual-learning protocols (class-incremental text classification, domain-incremental LM "
        "stream): the matrix R[i, j] of each variant (task j after learning task i), average, BWT and forgetting; "
        "a table on stdout, JSON (--json) and a PNG of the matrices.",
    )  # fmt: skip
    # the arguments of command.add_run_arguments, with RUN optional (--tiny replaces it)
    p.add_argument("run", nargs="?", default=None, help="a run directory or checkpoint dir (or --tiny VARIANT)")
    p.add_argument("--tiny", default=None, metavar="VARIANT", help="a fresh tiny model of VARIANT instead of a run")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--tokenizer", default=None, help="how to build the run's tokenizer, e.g. hf:<directory>")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report (JSON) to OUT")
    p.add_argument("--png", default=None, help="matrices PNG (default: the --json path with .png, if given)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also NESTLEARN_DEBUG=1)")
    _protocol_arguments(p)
    p.set_defaults(func=command)


def _protocol_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocols", default="class,domain", help="comma list of class, domain (default both)")
    p.add_argument("--mode", choices=MODES, default="context",
                   help="train: AdamW steps per task; context (default): frozen weights, the task is read")  # fmt: skip
    p.add_argument("--variants", default=None,
                   help="comma list: online, static, and with --tiny family variants (default: online, static where "
                   "the model has online CMS levels, transformer beside a tiny model)")  # fmt: skip
    p.add_argument("--data", default=None, metavar="DIR", help="prepared dataset whose sources are the classes "
                   "and domains (default: synthetic sources)")  # fmt: skip
    p.add_argument("--sources", default=None, help="comma list of the dataset's sources, in task order (default all)")
    p.add_argument("--synthetic", type=int, default=4, help="synthetic sources without --data (2-6, default 4)")
    p.add_argument("--classes-per-task", type=int, default=2)
    p.add_argument("--candidates", choices=CANDIDATES, default="seen",
                   help="classify among the classes seen so far (default) or all classes from the start")  # fmt: skip
    p.add_argument("--examples", type=int, default=16, help="texts learned per class (default 16)")
    p.add_argument("--test-examples", type=int, default=8, help="texts tested per class (default 8)")
    p.add_argument("--text-len", type=int, default=32, help="tokens per text (default 32)")
    p.add_argument("--learn-tokens", type=int, default=1024, help="tokens learned per domain (default 1024)")
    p.add_argument("--windows", type=int, default=8, help="test windows per domain (default 8)")
    p.add_argument("--window-len", type=int, default=64, help="tokens scored per window (default 64)")
    p.add_argument("--steps", type=int, default=20, help="train mode: AdamW steps per task (default 20)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step and per scoring call (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="train mode: AdamW learning rate (default 1e-3)")
    p.add_argument("--chunk", type=int, default=512, help="context mode: tokens per call while reading")
    p.add_argument("--seed", type=int, default=0)


def command(args: argparse.Namespace) -> None:
    """`nestlearn eval continual [RUN | --tiny VARIANT] ...` (see the module docstring)."""
    _check_args(args)
    base, tok, loaded = _model(args)
    sources = _sources(args, tok)
    _check_lengths(base, tok, sources, args)
    args.variants = _split(args.variants) or default_variants(base, args.tiny is not None)  # reported as used
    models = build_variants(base, args.variants, tiny=args.tiny is not None, seed=args.seed)
    material = plan(sources, args)  # every input is checked before the first progress line
    progress(_describe(base, loaded, args))
    names = ", ".join(s.name for s in sources)
    progress(f"{', '.join(models)} in {args.mode} mode on {len(sources)} sources ({names})")
    numbers = evaluate(models, tok, material, args)
    print(table(numbers, args.mode))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "debug")}
        write_report(args.json, "continual", {**config, "sources": [s.name for s in sources]}, numbers, loaded,
                     seed=args.seed)  # fmt: skip
        progress(f"report written to {args.json}")
    png = args.png or (Path(args.json).with_suffix(".png") if args.json else None)
    if png and (drawn := plot(numbers, Path(png), args.mode)):
        progress(f"matrices drawn in {drawn}")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot run before any model is built."""
    if (args.run is None) == (args.tiny is None):
        raise ValueError("give a run directory (RUN) or --tiny VARIANT, not both and not neither")
    args.protocols = _split(args.protocols)
    if not args.protocols or (bad := [p for p in args.protocols if p not in PROTOCOLS]):
        raise ValueError(f"--protocols: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(PROTOCOLS)}")
    for name in ("classes_per_task", "examples", "test_examples", "text_len", "windows", "window_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.learn_tokens < 2:
        raise ValueError(f"--learn-tokens must be >= 2, got {args.learn_tokens}")
    Settings(args.mode, args.steps, args.batch_size, args.lr, args.chunk, args.seed, args.window_len)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _model(args: argparse.Namespace) -> tuple[CausalLM, Tokenizer, Any]:
    """The base model, its tokenizer and the loaded run (None for --tiny)."""
    device = resolve_device(args.device)
    if args.tiny is None:
        from .load import load_run

        loaded = load_run(args.run, device, tokenizer=args.tokenizer)
        return loaded.model, loaded.tokenizer, loaded
    tok = _data_tokenizer(args) if args.data else ByteTokenizer()
    return tiny_model(args.tiny, tok.vocab_size, args.seed).to(device).eval(), tok, None


def _describe(model: CausalLM, loaded: Any, args: argparse.Namespace) -> str:
    if loaded is not None:
        return f"{loaded.checkpoint} (step {loaded.step}, {loaded.info['variant']})"
    return f"tiny {args.tiny} ({sum(p.numel() for p in model.parameters()):,} parameters), seed {args.seed}"


def _data_tokenizer(args: argparse.Namespace) -> Tokenizer:
    """The tokenizer a dataset was prepared with (for a tiny model: its vocabulary sizes the model)."""
    identity = Shards(_data_dir(args.data)).meta["tokenizer"]
    tok = get_tokenizer(args.tokenizer or identity.get("name", "?"))
    check_identity(identity, tok.identity, f"dataset {args.data}")
    return tok


def _data_dir(path: str) -> str:
    if not Path(path).is_dir():
        raise ValueError(f"--data {path} does not exist; pass the directory of a prepared dataset")
    return path


def _sources(args: argparse.Namespace, tok: Tokenizer) -> list[Source]:
    """The classes / domains, in task order; at least two tasks for each protocol."""
    if args.data is None:
        if args.sources:
            raise ValueError("--sources picks sources of a prepared dataset; pass --data DIR (or use --synthetic N)")
        sources = synthetic_sources(tok, args.synthetic, seed=args.seed)
    else:
        shards = Shards(_data_dir(args.data))
        shards.check_tokenizer(tok.identity)
        shards.verify()
        sources = dataset_sources(shards, _split(args.sources) or None)
    if "class" in args.protocols and len(sources) <= args.classes_per_task:
        raise ValueError(f"{len(sources)} sources in groups of --classes-per-task {args.classes_per_task} make one "
                         "task; the protocol needs at least two: lower --classes-per-task or add sources")  # fmt: skip
    if "domain" in args.protocols and len(sources) < 2:
        raise ValueError("the domain stream needs at least two sources; add sources")
    return sources


def _check_lengths(model: CausalLM, tok: Tokenizer, sources: Sequence[Source], args: argparse.Namespace) -> None:
    """A full-attention model reads at most `max_seq_len` tokens per row (`<eot> text => label<eot>`, a window)."""
    limit = max_context(model)
    label = max(len(tok.encode(f" {s.name}")) for s in sources) + 1
    longest = max(1 + args.text_len + len(tok.encode(SEPARATOR)) + label, args.window_len)
    if limit is not None and longest > limit:
        raise ValueError(f"rows of up to {longest} tokens are longer than this model's max_seq_len ({limit}); lower "
                         "--text-len / --window-len")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# output


def table(numbers: dict[str, Any], mode: str) -> str:
    """Every matrix with its metrics, as printed."""
    lines = []
    for protocol, res in numbers.items():
        names = res["tasks"] if protocol == "class" else [[d] for d in res["domains"]]
        what = "accuracy" if protocol == "class" else "loss (nats/token, lower is better)"
        lines.append(f"{protocol}-incremental, {mode} mode: {what} on task j (columns) after task i (rows); tasks: "
                     + "; ".join(f"t{k} = {', '.join(n)}" for k, n in enumerate(names)))  # fmt: skip
        for label, v in res["variants"].items():
            lines.append(f"  {label:<20}" + "".join(f"{f't{j}':>8}" for j in range(len(names))))
            lines += [f"    after t{i:<13}" + "".join(f"{x:8.3f}" for x in row) for i, row in enumerate(v["matrix"])]
            lines.append(f"    average {v['average']:.3f}   BWT {v['bwt']:+.3f}   forgetting {v['forgetting']:+.3f}   "
                         f"({v['seconds']:.1f} s)")  # fmt: skip
    return "\n".join(lines)


def plot(numbers: dict[str, Any], path: Path, mode: str) -> Path | None:
    """One heatmap per protocol and variant (rows: after task i, columns: task j); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the `plot` extra
        progress(f"matplotlib is not installed (pip install -e '.[plot]'); {path.name} not drawn")
        return None
    cols = max(len(res["variants"]) for res in numbers.values())
    fig, axes = plt.subplots(len(numbers), cols, figsize=(3.6 * cols, 3.3 * len(numbers)), squeeze=False)
    for row, (protocol, res) in zip(axes, numbers.items(), strict=True):
        for ax, (label, v) in zip(row, res["variants"].items(), strict=False):
            title = f"{protocol}, {mode}: {label}"
            _heatmap(ax, np.asarray(v["matrix"]), _task_names(protocol, res), title, accuracy=protocol == "class")
        for ax in row[len(res["variants"]) :]:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _task_names(protocol: str, res: dict[str, Any]) -> list[str]:
    """Each task's classes ("a,b") or domain name."""
    return [",".join(t) for t in res["tasks"]] if protocol == "class" else list(res["domains"])


def _heatmap(ax: Any, R: np.ndarray, names: list[str], title: str, *, accuracy: bool) -> None:
    """R `[T, T]`: an accuracy on a fixed 0-1 scale, a loss on its own range (lower = greener)."""
    lo, hi = (0.0, 1.0) if accuracy else (float(np.nanmin(R)), float(np.nanmax(R)) + 1e-9)
    ax.imshow(R, cmap="RdYlGn" if accuracy else "RdYlGn_r", vmin=lo, vmax=hi)
    for (i, j), x in np.ndenumerate(R):
        ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8)
    ticks = range(R.shape[0])
    ax.set(title=title, xlabel="on task j", ylabel="after task i", xticks=ticks, yticks=ticks)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
