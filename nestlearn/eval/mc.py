"""`nestlearn eval mc`: zero-shot multiple choice by log-likelihood, the way lm-eval scores it, with the context
read once through the learning state.

What this is: a task is a list of items (`Item`: context, choices, the index or indices of the right ones). An
item is scored by reading `[eot] + context` through the model's state once (`chunk` tokens per call, the state
passed on) and then every choice, `delimiter + choice`, from that context state (`score_continuations`): a
recurrent model never reads the context again per choice, and a choice scores what reading context + choice in
one pass scores (see Learning for the one exception). Each choice gets the sum of log p(choice tokens | context)
in float64 and whether greedy decoding reproduces it; an item is right under
- `acc`: the choice with the highest summed log-probability;
- `acc_norm`: the highest summed log-probability per character of the choice (lm-eval's acc_norm; the delimiter
  is not counted);
- `acc_per_token`: the highest mean log-probability per token;
ties go to the first choice (numpy's argmax, as lm-eval). `exact` is the share of items whose right choice greedy
decoding reproduces (lm-eval's exact_match; LAMBADA's accuracy), `perplexity` exp(-mean log-probability of the
right choice) (lm-eval's LAMBADA perplexity), `chance` the expected accuracy of a random pick.
Learning: an online CMS learns from the context while reading it (`learn=True`, the default; `--no-learn` reads
without updates). The choices are read with `learn=False`: states are values (a call returns a new state and
changes none), so choices scored from one context state never see each other anyway, and without learning
every token of every choice is predicted with the weights the context left, however the choice falls across the
CMS's update boundaries. Reading context + choice in one pass gives the same scores when no CMS update falls
inside the choice (always for variants without online levels). Every item starts from the initial state.
Tokenisation follows lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation,
context + continuation is encoded whole and the continuation is what follows the context's own encoding; the
context is preceded by the end-of-text separator, as every document is in training (lm-eval prefixes it only to
an empty context). A full-attention model keeps the last tokens of a context that does not fit `max_seq_len`
with the longest choice (the report counts the items cut), as lm-eval truncates on the left.
Tasks:
- `lambada`: LAMBADA-style last-word prediction built offline from held-out book text of a prepared dataset
  (`--data DIR`, default the run's own; `--split`, default its first `heldout_*` split, else `val`). A passage is
  a run of whole sentences of at least `--context-words` words followed by a sentence whose last word (letters
  only, at least 3 of them, not an abbreviation such as "Mrs") is the target; the context is the passage up to
  the whitespace before that word, the punctuation after it is dropped. Scored as exact greedy match of that
  whitespace + word (`exact`, LAMBADA's accuracy) and as choice among the word and `--distractors` other words of the
  passage (distinct, 3+ letters, at a random position): distractors from the passage are as present in the
  context as the target often is, so copying a recent word does not pick the answer. Documents are visited in a
  seeded order and passages drawn within each, so a seed gives the same items on the same data.
- `--task-file PATH`: JSON (a list of items) or JSONL (an item per line): {"context": str, "choices": [str, ...],
  "answer": int or [int, ...], "delimiter": str (optional, default " ")}; a BIG-bench `task.json` (an object
  whose examples hold `target_scores`) is read as well.
- `bigbench:NAME`: the JSON multiple-choice tasks of BIG-bench from the PyPI sdist `bigbench` 1.0.0, pinned by
  SHA-256 and downloaded once (358 MB, `pip download --no-deps`; installing it is impractical: it requires
  tensorflow, t5 and seqio) into `$NESTLEARN_CACHE/bigbench-1.0.0/` (default `~/.cache/nestlearn`), where each
  task asked for is extracted (NAME as in `benchmark_tasks/`, e.g. `anachronisms`, `arithmetic/1_digit_addition`;
  320 of its JSON tasks are multiple choice). Zero-shot prompts follow BIG-bench's defaults (task_prefix +
  "\\nQ: " + input, the choices appended in its seeded order unless the task says not, + "\\nA: "); the right
  choices are those with the top target score. Programmatic BIG-bench tasks (task.py) are not available.
The command prints a table on stdout and progress on stderr; with --json the report (`write_report`, kind "mc")
holds each task's metrics, its source (data split and seed, file SHA-256, package) and per-item records.
What it is not: few-shot prompting, generative tasks, or the lm-eval harness itself (`lm_eval_adapter.py` runs
lm-eval's tasks through the same scorer).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import random
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.corpora import cache_dir, download, verified
from ..data.shards import Shards
from ..io import write_text_atomic
from .longctx import max_context

Progress = Callable[[str], None]
TASKS = ("lambada", "bigbench:NAME")
LAMBADA_ITEMS = 200
MIN_LETTERS = 3
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "rev", "col", "capt", "gen", "hon",
                           "messrs", "mme", "mlle", "viz", "etc", "vs", "vol", "ch", "no"})  # fmt: skip
WORD = re.compile(r"[^\W\d_]+")
SENTENCE_END = re.compile(r"(?<!\w)([^\W\d_]+)[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
BIGBENCH = (
    "bigbench",
    "1.0.0",
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
)
PIN = "nestlearn/eval/mc.py (BIGBENCH)"  # where the BIG-bench archive is pinned (named in the messages)
BIGBENCH_SEED = 42  # BIG-bench's default random_seed: the order of the choices appended to the input


@dataclass(frozen=True)
class Item:
    """One question: the model reads `context`, then each `delimiter + choice`; `answer` holds the indices of the
    right choices (usually one)."""

    context: str
    choices: tuple[str, ...]
    answer: tuple[int, ...]
    delimiter: str = " "


@dataclass(frozen=True)
class Task:
    """A named list of items and where they came from (recorded in the report)."""

    name: str
    items: tuple[Item, ...]
    source: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scored:
    """One continuation: summed log-probability (nats), its tokens, whether greedy decoding reproduces it."""

    logprob: float
    tokens: int
    greedy: bool


@dataclass(frozen=True)
class ContextScores:
    """The continuations of one context, and the context as read: tokens read (separator included) and the
    tokens dropped from its left (full attention past max_seq_len)."""

    scores: tuple[Scored, ...]
    context_tokens: int
    cut: int


@dataclass(frozen=True)
class ItemScore:
    """One item's result: per choice the summed log-probability, tokens and greedy flag; the choice picked by
    each rule (`pred`: sum, `pred_norm`: per character, `pred_token`: per token)."""

    logprobs: tuple[float, ...]
    tokens: tuple[int, ...]
    greedy: tuple[bool, ...]
    pred: int
    pred_norm: int
    pred_token: int
    context_tokens: int
    cut: int


# ---------------------------------------------------------------------------------------------------------
# scoring


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of context and continuation (module docstring) -> (`[eot] + context ids`, continuation
    ids). ValueError when the continuation encodes to no token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"the continuation {continuation!r} encodes to no token; every choice needs text")
    return [tokenizer.eot, *ctx], cont


@torch.no_grad()
def read_context(model: Any, ids: Sequence[int], *, learn: bool = True, chunk: int = 2048) -> tuple[Tensor, Any]:
    """Read `ids` `[T]` from the initial state, `chunk` tokens per call. -> logits `[V]` after the last, state."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    state, last, device = None, None, _device(model)
    for start in range(0, len(ids), chunk):
        logits, state = model(torch.tensor([list(ids[start : start + chunk])], device=device), state, learn=learn)
        last = logits[0, -1]
    assert last is not None, "nothing to read"
    return last, state


@torch.no_grad()
def score_continuation(model: Any, logits: Tensor, state: Any, tokens: Sequence[int]) -> Scored:
    """Log-probability of `tokens` `[m]` after logits `[V]` and their state; the tokens are read with
    `learn=False` (module docstring). The state is not changed."""
    rows = [logits[None]]
    if len(tokens) > 1:
        more, _ = model(torch.tensor([list(tokens[:-1])], device=_device(model)), state, learn=False)
        rows.append(more[0])
    x = torch.cat(rows).double()  # [m, V]
    target = torch.tensor(list(tokens), device=x.device)
    logp = torch.log_softmax(x, dim=-1)[torch.arange(len(tokens), device=x.device), target]
    return Scored(float(logp.sum()), len(tokens), bool((x.argmax(-1) == target).all()))


def score_continuations(
    model: Any, tokenizer: Any, context: str, continuations: Sequence[str], *, learn: bool = True, chunk: int = 2048
) -> ContextScores:
    """Read the context once and score every continuation from its state (module docstring)."""
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    ctx, cut = fit_context(model, pairs[0][0], max(len(c) for _, c in pairs))
    _check_vocabulary(model, [ctx, *(c for _, c in pairs)])
    logits, state = read_context(model, ctx, learn=learn, chunk=chunk)
    scores = tuple(score_continuation(model, logits, state, cont) for _, cont in pairs)
    return ContextScores(scores, len(ctx), cut)


def fit_context(model: Any, ctx: list[int], longest: int) -> tuple[list[int], int]:
    """The context's last tokens that fit a full-attention model with the longest continuation, and how many were
    dropped (0 for a recurrent model)."""
    limit = max_context(model)
    if limit is None or len(ctx) + longest - 1 <= limit:
        return ctx, 0
    keep = limit - (longest - 1)
    if keep < 1:
        raise ValueError(f"a choice of {longest} tokens does not fit this model's max_seq_len ({limit}); shorten it")
    return ctx[-keep:], len(ctx) - keep


def score_item(model: Any, tokenizer: Any, item: Item, *, learn: bool = True, chunk: int = 2048) -> ItemScore:
    """Score every choice of `item` from one reading of its context."""
    conts = [item.delimiter + c for c in item.choices]
    read = score_continuations(model, tokenizer, item.context, conts, learn=learn, chunk=chunk)
    lls = [s.logprob for s in read.scores]
    tokens = tuple(s.tokens for s in read.scores)
    return ItemScore(
        tuple(lls), tokens, tuple(s.greedy for s in read.scores), argmax(lls),
        argmax([ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]),
        argmax([ll / n for ll, n in zip(lls, tokens, strict=True)]), read.context_tokens, read.cut,
    )  # fmt: skip


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: values[i])


def summarize(items: Sequence[Item], scores: Sequence[ItemScore]) -> dict[str, Any]:
    """The task's metrics (module docstring) over scored items."""
    n = len(scores)
    gold = [s.logprobs[it.answer[0]] for it, s in zip(items, scores, strict=True)]

    def share(hit: Callable[[Item, ItemScore], bool]) -> float:
        return sum(hit(it, s) for it, s in zip(items, scores, strict=True)) / n if n else math.nan

    return {
        "items": n,
        "acc": share(lambda it, s: s.pred in it.answer),
        "acc_norm": share(lambda it, s: s.pred_norm in it.answer),
        "acc_per_token": share(lambda it, s: s.pred_token in it.answer),
        "exact": share(lambda it, s: any(s.greedy[a] for a in it.answer)),
        "chance": sum(len(it.answer) / len(it.choices) for it in items) / n if n else math.nan,
        "perplexity": math.exp(min(-sum(gold) / n, 700.0)) if n else math.nan,
        "cut": sum(s.cut > 0 for s in scores),
    }


def evaluate_task(
    model: Any, tokenizer: Any, task: Task, *, learn: bool = True, chunk: int = 2048, progress: Progress | None = None
) -> dict[str, Any]:
    """Score every item of `task`. -> its metrics (`summarize`) and per-item `records`."""
    scores, start, last = [], time.perf_counter(), time.perf_counter()
    for k, item in enumerate(task.items):
        scores.append(score_item(model, tokenizer, item, learn=learn, chunk=chunk))
        if progress is not None and time.perf_counter() - last >= 10 and k + 1 < len(task.items):
            last = time.perf_counter()
            acc = summarize(task.items[: k + 1], scores)["acc"]
            progress(f"{task.name}: {k + 1}/{len(task.items)} items, acc {acc:.3f}")
    out = summarize(task.items, scores)
    out["seconds"] = round(time.perf_counter() - start, 3)
    out["records"] = [_record(it, s) for it, s in zip(task.items, scores, strict=True)]
    return out


def _record(item: Item, s: ItemScore) -> dict[str, Any]:
    return {"context": item.context, "delimiter": item.delimiter, "choices": list(item.choices),
            "answer": list(item.answer), "logprobs": list(s.logprobs), "tokens": list(s.tokens),
            "greedy": list(s.greedy), "pred": s.pred, "pred_norm": s.pred_norm, "pred_token": s.pred_token,
            "context_tokens": s.context_tokens, "cut": s.cut}  # fmt: skip


def _device(model: Any) -> torch.device:
    return getattr(model, "device", None) or torch.device("cpu")


def _check_vocabulary(model: Any, pieces: Sequence[Sequence[int]]) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = max(max(p) for p in pieces if p)
    if vocab is not None and top >= vocab:
        raise ValueError(f"the tokenizer produced id {top} but the model's vocabulary has {vocab} ids; evaluate "
                         "with the tokenizer the model was trained with")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# LAMBADA-style last-word prediction


def passages(text: str, context_words: int) -> list[tuple[int, int, int]]:
    """Every LAMBADA passage of `text` (module docstring): (passage start, target start, target end) offsets."""
    ends = [m for m in SENTENCE_END.finditer(text) if _sentence_word(m.group(1))]
    starts = [0, *(_skip_space(text, m.end()) for m in ends)]
    words = [m.start() for m in WORD.finditer(text)]
    out = []
    for m in ends:
        w0, w1 = m.span(1)
        k = bisect.bisect_left(words, w0)
        if len(m.group(1)) < MIN_LETTERS or not text[w0 - 1 : w0].isspace() or k < context_words:
            continue
        out.append((starts[bisect.bisect_right(starts, words[k - context_words]) - 1], w0, w1))
    return out


def lambada_item(text: str, passage: tuple[int, int, int], rng: random.Random, distractors: int) -> Item | None:
    """The item of one passage: the target among `distractors` words of the context (None: too few words)."""
    start, w0, w1 = passage
    head, target = text[start:w0], text[w0:w1]
    context = head.rstrip()
    forms: dict[str, str] = {}
    for w in WORD.findall(context):
        forms.setdefault(w.lower(), w)
    pool = [w for low, w in forms.items() if len(w) >= MIN_LETTERS and low != target.lower() and _sentence_word(w)]
    if len(pool) < distractors:
        return None
    picked, at = rng.sample(pool, distractors), rng.randrange(distractors + 1)
    return Item(context, (*picked[:at], target, *picked[at:]), (at,), head[len(context) :])


def lambada_items(
    texts: Sequence[str], count: int, seed: int = 0, *, context_words: int = 50, distractors: int = 3
) -> list[Item]:
    """Up to `count` items from documents `texts`, deterministic per seed: documents in a seeded order, at most
    ceil(count / documents) passages from each, drawn at random within it."""
    if count < 1 or context_words < 1 or distractors < 1:
        raise ValueError("--items, --context-words and --distractors must be >= 1")
    rng = random.Random(f"nestlearn.eval.mc.lambada:{seed}")
    per_doc, items = max(1, -(-count // max(1, len(texts)))), []
    for i in rng.sample(range(len(texts)), len(texts)):
        text = texts[i]
        found = passages(text, context_words)
        made = 0
        for j in rng.sample(range(len(found)), len(found)):
            item = lambada_item(text, found[j], rng, distractors)
            if item is not None:
                items.append(item)
                made += 1
                if len(items) == count:
                    return items
            if made == per_doc:
                break
    return items


class SplitTexts(Sequence[str]):
    """The documents of a prepared split as text (decoded when asked for, separators left out)."""

    def __init__(self, shards: Shards, split: str, tokenizer: Any) -> None:
        self.data, self.tokenizer = shards.tokens(split), tokenizer
        starts = np.load(shards.dir / f"{split}.docs.npy")
        self.spans = list(zip(starts.tolist(), [*starts[1:].tolist(), int(self.data.size)], strict=True))

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: Any) -> Any:
        a, b = self.spans[i]
        return self.tokenizer.decode(np.asarray(self.data[a : b - 1], dtype=np.int64).tolist())


def lambada_task(shards: Shards, split: str | None, tokenizer: Any, count: int, seed: int, *, context_words: int,
                 distractors: int) -> Task:  # fmt: skip
    """The LAMBADA task of a prepared dataset's split (default: its first held-out split, else val)."""
    have = [name.removesuffix(".bin") for name in shards.meta["files"]]
    split = split or next((s for s in have if s.startswith("heldout_")), "val")
    if split not in have:
        raise ValueError(f"{shards.dir} has no split {split!r}; it has {', '.join(have)}")
    items = lambada_items(SplitTexts(shards, split, tokenizer), count, seed, context_words=context_words,
                          distractors=distractors)  # fmt: skip
    if not items:
        raise ValueError(f"split {split!r} of {shards.dir} holds no passage of {context_words}+ words ending in a word "
                         "with enough distractors; lower --context-words or choose another --split")  # fmt: skip
    source = {"data": str(shards.dir), "split": split, "seed": seed, "context_words": context_words,
              "distractors": distractors}  # fmt: skip
    return Task("lambada", tuple(items), source)


def _sentence_word(word: str) -> bool:
    """A word that can end a sentence: not an abbreviation or an initial."""
    return len(word) > 1 and word.lower() not in ABBREVIATIONS


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


# ---------------------------------------------------------------------------------------------------------
# task files


def load_task_file(path: str | Path, limit: int | None = None) -> Task:
    """A task from a JSON / JSONL item file or a BIG-bench task.json (module docstring); ValueError naming the
    file, the item and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist; --task-file takes a JSON or JSONL file of items "
                         '{"context", "choices", "answer"}')  # fmt: skip
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"task file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    data = _json_or_none(text)
    if isinstance(data, dict) and "examples" in data:
        items = bigbench_items(data, str(path))
    else:
        items = [check_item(raw, where) for where, raw in _raw_items(text, data, path)]
    if not items:
        raise ValueError(f"task file {path} holds no items")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Task(f"file:{path.stem}", tuple(items[:limit]), {"file": str(path), "sha256": digest})


def _raw_items(text: str, data: Any, path: Path) -> list[tuple[str, Any]]:
    """(where, raw item) of a JSON list, else of JSONL lines."""
    if isinstance(data, list):
        return [(f"{path}: item {i + 1}", raw) for i, raw in enumerate(data)]
    out, lines = [], [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for k, (n, line) in enumerate(lines):
        try:
            out.append((f"{path}: item {k + 1} (line {n})", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno})") from None
    return out


def check_item(raw: Any, where: str) -> Item:
    """An `Item` from a JSON object {"context", "choices", "answer", "delimiter"?}; ValueError naming `where`."""
    if not isinstance(raw, dict):
        raise ValueError(f'{where} is a {type(raw).__name__}, not an object {{"context", "choices", "answer"}}')
    missing = [k for k in ("context", "choices", "answer") if k not in raw]
    if missing:
        raise ValueError(f"{where} has no {', '.join(repr(k) for k in missing)}")
    if not isinstance(raw["context"], str) or not isinstance(raw.get("delimiter", " "), str):
        raise ValueError(f"{where}: context and delimiter must be strings")
    choices = raw["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if len(set(choices)) < len(choices):
        raise ValueError(f"{where}: choices repeat; every choice must differ")
    return Item(raw["context"], tuple(choices), _answer(raw["answer"], len(choices), where), raw.get("delimiter", " "))


def _answer(answer: Any, n: int, where: str) -> tuple[int, ...]:
    out = tuple(answer) if isinstance(answer, list) else (answer,)
    if not out or len(set(out)) < len(out) or not all(type(a) is int and 0 <= a < n for a in out):
        raise ValueError(f"{where}: answer must be a choice index 0..{n - 1} or a list of distinct ones, got "
                         f"{json.dumps(answer)}")  # fmt: skip
    return out


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------------------------------------------------
# BIG-bench


def bigbench_items(data: dict[str, Any], where: str) -> list[Item]:
    """The zero-shot items of a BIG-bench JSON task (module docstring); duplicate examples are dropped, as
    BIG-bench drops them."""
    examples = list({json.dumps(e, sort_keys=True): e for e in data.get("examples") or []}.values())
    if not examples or not all(isinstance(e, dict) and isinstance(e.get("target_scores"), dict) for e in examples):
        raise ValueError(f"{where} is not a multiple-choice BIG-bench task (every example needs target_scores)")
    fmt = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
           "choice_prefix": "\n  choice: ", "append_choices_to_input": True}  # fmt: skip
    fmt.update({k: data[k] for k in fmt if k in data})
    return [_bigbench_item(e, fmt, f"{where}: example {i + 1}") for i, e in enumerate(examples)]


def _bigbench_item(example: dict[str, Any], fmt: dict[str, Any], where: str) -> Item:
    scores: dict[str, float] = example["target_scores"]
    choices, text = list(scores), str(example.get("input", ""))
    top = max(scores.values(), default=0)
    if len(choices) < 2 or top <= min(scores.values()):
        raise ValueError(f"{where}: needs 2+ choices and a top target score above the others")
    if fmt["append_choices_to_input"]:
        shown = np.random.RandomState(seed=BIGBENCH_SEED).permutation(sorted(choices)).tolist()
        text += fmt["choice_prefix"] + fmt["choice_prefix"].join(shown)
    context = str(fmt["task_prefix"]) + fmt["example_input_prefix"] + text + fmt["example_output_prefix"]
    return Item(context, tuple(choices), tuple(i for i, c in enumerate(choices) if scores[c] == top), "")


def bigbench_task(name: str, limit: int | None = None, progress: Progress | None = None) -> Task:
    """BIG-bench JSON task `name` (e.g. "anachronisms", "arithmetic/1_digit_addition"), fetched once."""
    path = bigbench_file(name, progress)
    items = bigbench_items(json.loads(path.read_text(encoding="utf-8")), f"bigbench task {name}")
    package, version, *_ = BIGBENCH
    return Task(f"bigbench:{name}", tuple(items[:limit]), {"package": f"{package} {version}", "task": name})


def bigbench_file(name: str, progress: Progress | None = None) -> Path:
    """The cached task.json of `name`, extracted from the pinned sdist (downloaded once) when first asked for."""
    if not re.fullmatch(r"[\w\-]+(/[\w\-]+)?", name):
        raise ValueError(f"bigbench task {name!r} is not a task name; write e.g. bigbench:anachronisms")
    root = cache_dir() / f"bigbench-{BIGBENCH[1]}"
    out = root / "tasks" / name / "task.json"
    if not out.is_file():
        _extract_bigbench(_bigbench_archive(root, progress), name, root, progress)
    return out


def _bigbench_archive(root: Path, progress: Progress | None) -> Path:
    """The pinned sdist in the cache, downloaded and checked against its SHA-256 once."""
    package, version, archive, sha = BIGBENCH
    path = root / archive
    if path.is_file():
        return path
    if progress is not None:
        progress(f"downloading the {package} {version} sdist (358 MB, once) into {root}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        got = download("pypi-sdist", (package, version, archive), Path(tmp), pin=PIN)
        verified(got, sha, pin=PIN).rename(path)
    return path


def _extract_bigbench(archive: Path, name: str, root: Path, progress: Progress | None) -> None:
    """Extract `name`'s task.json (one pass over the archive, which also records every task's name)."""
    if progress is not None:
        progress(f"extracting bigbench task {name} from {archive.name}")
    prefix, member, names = f"bigbench-{BIGBENCH[1]}/bigbench/benchmark_tasks/", f"{name}/task.json", []
    with tarfile.open(archive) as tar:
        for info in tar:
            rel = info.name.removeprefix(prefix)
            if rel != info.name and rel.endswith("/task.json"):
                names.append(rel.removesuffix("/task.json"))
            if rel == member and info.isfile():
                out = root / "tasks" / member
                out.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(out, tar.extractfile(info).read().decode("utf-8"))  # type: ignore[union-attr]
                return
    close = get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"bigbench {BIGBENCH[1]} has no JSON task {name!r}{hint}; names are the folders of "
                     "bigbench/benchmark_tasks/ that hold a task.json, e.g. anachronisms")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# the command


def register(subparsers: Any) -> None:
    """Add `mc` to the `nestlearn eval` subparsers."""
    from .command import add_run_arguments

    p = subparsers.add_parser(
        "mc", help="zero-shot multiple choice by log-likelihood (LAMBADA-style, task files, BIG-bench JSON)",
        description="Zero-shot multiple choice scored by log-likelihood as lm-eval scores it (acc, acc_norm), the "
        "context read once through the state; a table on stdout, JSON with --json.",
    )  # fmt: skip
    add_run_arguments(p)
    p.add_argument("--tasks", default=None, help="comma list of lambada, bigbench:NAME (default lambada, or none "
                   "when --task-file is given)")  # fmt: skip
    p.add_argument("--task-file", action="append", default=[], metavar="PATH", help="JSON / JSONL items "
                   '{"context", "choices", "answer"} or a BIG-bench task.json (repeatable)')  # fmt: skip
    p.add_argument("--items", type=int, default=None, help=f"LAMBADA items to build (default {LAMBADA_ITEMS}); "
                   "the first N items of the other tasks (default all)")  # fmt: skip
    p.add_argument("--data", default=None, metavar="DIR", help="LAMBADA: prepared dataset (default: the run's own)")
    p.add_argument("--split", default=None, help="LAMBADA: the split (default its first heldout_*, else val)")
    p.add_argument("--context-words", type=int, default=50, help="LAMBADA: least words before the target")
    p.add_argument("--distractors", type=int, default=3, help="LAMBADA: wrong words per item, from the passage")
    p.add_argument("--seed", type=int, default=0, help="LAMBADA: which passages and distractors")
    p.add_argument("--chunk", type=int, default=2048, help="context tokens per model call (default 2048)")
    p.add_argument("--learn", action=argparse.BooleanOptionalAction, default=True,
                   help="online CMS levels learn from the context (choices never learn)")  # fmt: skip
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    """`nestlearn eval mc RUN ...` (module docstring): task files and BIG-bench tasks are read before the run is
    loaded (a bad one fails at once), the LAMBADA items after (they need the run's data and tokenizer)."""
    from ..train.loop import resolve_device
    from .load import load_run
    from .report import progress, write_report

    names = task_names(args.tasks, bool(args.task_file))
    if args.items is not None and args.items < 1:
        raise ValueError(f"--items must be >= 1, got {args.items}")
    tasks = [load_task_file(p, args.items) for p in args.task_file]
    tasks += [bigbench_task(n.removeprefix("bigbench:"), args.items, progress) for n in names if n != "lambada"]
    loaded = load_run(args.run, resolve_device(args.device), tokenizer=args.tokenizer)
    progress(f"{loaded.checkpoint} (step {loaded.step}, {loaded.info['variant']})")
    if "lambada" in names:
        tasks.insert(0, _lambada(loaded, args, progress))
    numbers = {}
    for task in _unique(tasks):
        progress(f"{task.name}: {len(task.items)} items")
        numbers[task.name] = evaluate_task(loaded.model, loaded.tokenizer, task, learn=args.learn, chunk=args.chunk,
                                           progress=progress)  # fmt: skip
        numbers[task.name]["source"] = task.source
    print(table(numbers))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "debug")}
        write_report(args.json, "mc", config, numbers, loaded, seed=args.seed)
        progress(f"report written to {args.json}")


def _lambada(loaded: Any, args: argparse.Namespace, progress: Progress) -> Task:
    """The LAMBADA task of the command's data and split."""
    from .lm import open_data

    shards = open_data(loaded, args.data)
    task = lambada_task(shards, args.split, loaded.tokenizer, args.items or LAMBADA_ITEMS, args.seed,
                        context_words=args.context_words, distractors=args.distractors)  # fmt: skip
    progress(f"lambada: passages from split {task.source['split']} of {shards.dir} (seed {args.seed})")
    return task


def task_names(text: str | None, files: bool) -> list[str]:
    """The built-in tasks asked for (default lambada unless task files are given); ValueError for unknown ones."""
    names = [t.strip() for t in (text if text is not None else "" if files else "lambada").split(",") if t.strip()]
    bad = [t for t in names if t != "lambada" and not (t.startswith("bigbench:") and len(t) > len("bigbench:"))]
    if bad:
        raise ValueError(f"unknown task {', '.join(repr(t) for t in bad)}; choose lambada or bigbench:NAME (e.g. "
                         "bigbench:anachronisms), or pass --task-file PATH")  # fmt: skip
    if not names and not files:
        raise ValueError("no task given; pass --tasks lambada,bigbench:NAME or --task-file PATH")
    return list(dict.fromkeys(names))


def _unique(tasks: list[Task]) -> list[Task]:
    """Tasks with distinct names (a repeated name gets #2, #3, ...)."""
    seen: dict[str, int] = {}
    out = []
    for t in tasks:
        seen[t.name] = seen.get(t.name, 0) + 1
        out.append(t if seen[t.name] == 1 else Task(f"{t.name}#{seen[t.name]}", t.items, t.source))
    return out


def table(numbers: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    rows = [f"{'task':<32} {'items':>6} {'acc':>6} {'acc_norm':>8} {'acc_tok':>7} {'exact':>6} {'chance':>6} "
            f"{'ppl':>10} {'cut':>4}"]  # fmt: skip
    for name, m in numbers.items():
        rows.append(f"{name:<32} {m['items']:>6} {m['acc']:>6.3f} {m['acc_norm']:>8.3f} {m['acc_per_token']:>7.3f} "
                    f"{m['exact']:>6.3f} {m['chance']:>6.3f} {m['perplexity']:>10.4g} {m['cut']:>4}")  # fmt: skip
    return "\n".join(rows)
