"""Needle-in-a-haystack samples, RULER-style (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), and the haystacks and weaving that BABILong samples share.

What this is: `niah_sample(task, tokenizer, length, depth, haystack, seed)` builds one sample as token ids: an
instruction header, a haystack of filler sentences with the needle(s) woven in at sentence boundaries, and one or
more queries (the question followed by the answer prefix, e.g. "... The pass key is"), each with the values its
answer must contain and wrong values of the same kind to rank them against. Tasks (`TASKS`):
- "passkey": Mohtashami & Jaggi (2023): "The pass key is 12345. Remember it. 12345 is the pass key.";
- "single": one needle "One of the special magic numbers for {key} is: {value}." (RULER niah_single);
- "multikey": the needle plus `needles - 1` distractor needles with other keys (RULER niah_multikey_1); their
  values are the first wrong candidates;
- "multiquery": `needles` needles with distinct keys, every key asked, one query each (RULER asks them in one
  question; here each query continues from the same context state, so each has its own answer and rank);
- "multivalue": one key with `needles` values, one query whose answer must contain all of them.
Keys are adjective-noun pairs ("quiet-lantern"); values are 7-digit numbers, nouns or UUIDs (`kind`).
Haystacks: `Noise()` repeats RULER's five filler sentences ("The grass is green. ..."); `Book(text)` cycles the
sentences of a text from a seeded offset (`load_haystack` reads a project corpus, e.g. "austen", or
"file:PATH"). `length` counts every token the model reads: header, haystack, needles, question and the answer
(the longest of the reference and the candidates), so a model with `max_seq_len = length` fits exactly.
Depth: the first needle goes to the sentence boundary nearest `depth * haystack tokens` (0 = right after the
header, 1 = right before the question); the other needles go to seeded uniform depths. Pieces are encoded one
by one (" " + sentence), so the needle's tokens are exactly its own encoding and its span is recorded.
The needles (keys, values, wrong candidates) depend on (task, kind, needles, seed) only, so every cell of a grid
hides the same ones; where they go and the book's starting sentence depend on the length and depth as well.
What it is not: the scoring or the grid (`longctx.py`), or the bAbI stories (`babilong.py`).
"""

from __future__ import annotations

import random
import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

TASKS: tuple[str, ...] = ("passkey", "single", "multikey", "multiquery", "multivalue")
KINDS: tuple[str, ...] = ("number", "word", "uuid")
NOISE: tuple[str, ...] = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                          "There and back again.")  # fmt: skip
PASSKEY_HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
ADJECTIVES = ("quiet", "amber", "brave", "crooked", "distant", "eager", "faded", "gentle", "hollow", "icy", "jolly",
              "lively", "mellow", "narrow", "olive", "proud", "rapid", "silent", "tidy", "vivid", "woolen", "young",
              "bitter", "curious", "dusty", "frozen", "golden", "humble", "marble", "sturdy")  # fmt: skip
NOUNS = ("lantern", "harbor", "meadow", "compass", "violin", "pebble", "orchard", "ladder", "saddle", "anchor",
         "candle", "falcon", "glacier", "hammer", "island", "kettle", "lizard", "mirror", "needle", "oyster",
         "parrot", "quarry", "ribbon", "spindle", "tunnel", "walnut", "barrel", "cellar", "dagger",
         "thimble")  # fmt: skip


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


class Haystack(Protocol):
    """A source of filler sentences; `sentences(rng)` is an endless iterator."""

    name: str

    def sentences(self, rng: random.Random) -> Iterator[str]: ...


class TooShort(ValueError):
    """The requested length cannot hold the header, the pieces and the question."""


@dataclass(frozen=True)
class Query:
    """A question read after the context. `prompt`: its token ids (question + answer prefix); `answers`: the
    values the answer must contain; `distractors`: wrong values each answer is ranked against; `target`: the
    reference continuation (" " + the answers joined by ", "); `budget`: the most tokens an answer takes (the
    target or any candidate " " + value)."""

    text: str
    prompt: list[int]
    answers: tuple[str, ...]
    distractors: tuple[str, ...]
    target: str
    budget: int


@dataclass(frozen=True)
class Sample:
    """One long-context sample: `context` token ids (header, haystack, pieces), the queries that follow it, the
    woven pieces (needles or facts) with their token spans `[start, end)` in `context`, the haystack's token
    count, and what built it (`meta`: task, length, seed, ..., the header text and each piece's depth)."""

    context: list[int]
    queries: tuple[Query, ...]
    pieces: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    haystack_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Every token the model reads for the longest query, its answer included."""
        return len(self.context) + max(len(q.prompt) + q.budget for q in self.queries)


# ---------------------------------------------------------------------------------------------------------
# haystacks


@dataclass(frozen=True)
class Noise:
    """RULER's noise haystack: its five sentences over and over (no offset: `rng` is unused)."""

    name: str = "noise"

    def sentences(self, rng: random.Random) -> Iterator[str]:
        while True:
            yield from NOISE


class Book:
    """The sentences (and `;` / `:` clauses) of a text, cycled from a seeded starting sentence."""

    def __init__(self, text: str, name: str = "book") -> None:
        self.name = name
        self.lines = split_sentences(text)
        if not self.lines:
            raise ValueError(f"haystack {name!r} holds no text")

    def sentences(self, rng: random.Random) -> Iterator[str]:
        i = rng.randrange(len(self.lines))
        while True:
            yield self.lines[i]
            i = (i + 1) % len(self.lines)


def split_sentences(text: str) -> list[str]:
    """Whitespace collapsed, split after `.`, `!`, `?`, `;` or `:` followed by a space."""
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?;:])\s+", flat) if s]


def load_haystack(name: str) -> Haystack:
    """The haystack named "noise", "file:PATH" (a UTF-8 text) or a corpus of `nestlearn.data.corpora` (fetched
    into the cache if needed; its documents joined in id order), e.g. "austen", "kjv", "shakespeare"."""
    if name == "noise":
        return Noise()
    if name.startswith("file:"):
        return Book(Path(name[5:]).read_text(encoding="utf-8"), name)
    from ..data.corpora import CORPORA, read_docs

    if name not in CORPORA:
        raise ValueError(f"unknown haystack {name!r}; use noise, file:PATH or a corpus: {', '.join(CORPORA)}")
    docs = read_docs(name)
    return Book("\n\n".join(docs[k] for k in sorted(docs)), name)


# ---------------------------------------------------------------------------------------------------------
# weaving pieces into a haystack


def fill(enc: Encoder, sentences: Iterator[str], n: int) -> list[list[int]]:
    """Token ids of consecutive sentences (" " + sentence each), `n` tokens in all (the last one cut)."""
    out, total = [], 0
    while total < n:
        toks = enc.encode(" " + next(sentences))[: n - total]
        out.append(toks)
        total += len(toks)
    return out


def weave(
    head: list[int], chunks: list[list[int]], pieces: Sequence[list[int]], depths: Sequence[float]
) -> tuple[list[int], list[tuple[int, int]]]:
    """header + haystack sentence ids `chunks` with each piece's ids at the sentence boundary nearest its depth
    (a fraction of the haystack tokens; pieces at the same boundary keep their order). -> ids, piece spans."""
    bounds = list(accumulate((len(c) for c in chunks), initial=0))
    at: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(depths):
        at[min(range(len(bounds)), key=lambda k, t=d * bounds[-1]: abs(bounds[k] - t))].append(i)
    ids, spans = list(head), [(0, 0)] * len(pieces)
    for k in range(len(chunks) + 1):
        for i in at.get(k, []):
            spans[i] = (len(ids), len(ids) + len(pieces[i]))
            ids += pieces[i]
        if k < len(chunks):
            ids += chunks[k]
    return ids, spans


def make_query(enc: Encoder, text: str, answers: Sequence[str], distractors: Sequence[str]) -> Query:
    """A query whose prompt is "\\n" + text, with its answer budget for the length accounting."""
    target = " " + ", ".join(answers)
    budget = max(len(enc.encode(c)) for c in [target, *(" " + v for v in (*answers, *distractors))])
    return Query(text, enc.encode("\n" + text), tuple(answers), tuple(distractors), target, budget)


def assemble(
    enc: Encoder,
    header: str,
    pieces: Sequence[str],
    depths: Sequence[float],
    queries: Sequence[Query],
    haystack: Haystack | None,
    length: int,
    rng: random.Random,
    meta: dict[str, Any],
) -> Sample:
    """The sample of `length` tokens (see the module docstring); `haystack=None` means no filler at all."""
    head, ids = enc.encode(header), [enc.encode(" " + p) for p in pieces]
    fixed = len(head) + sum(map(len, ids)) + max(len(q.prompt) + q.budget for q in queries)
    n = 0 if haystack is None else length - fixed
    if n < 0:
        raise TooShort(
            f"length {length:,} is too short for this {meta.get('task', 'task')}: its header, "
            f"{len(pieces)} piece(s), question and answer take {fixed:,} tokens; use a length of at least {fixed:,}"
        )
    chunks = fill(enc, haystack.sentences(rng), n) if haystack is not None else []
    context, spans = weave(head, chunks, ids, depths)
    return Sample(context, tuple(queries), tuple(pieces), tuple(spans), n, {**meta, "header": header,
                  "depths": list(depths)})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# NIAH tasks


def niah_sample(
    task: str,
    tokenizer: Encoder,
    length: int,
    depth: float,
    haystack: Haystack,
    seed: int | str = 0,
    *,
    needles: int = 4,
    kind: str = "number",
    candidates: int = 10,
) -> Sample:
    """One NIAH sample of `length` tokens with the (first) needle at `depth` in [0, 1] (module docstring)."""
    _check(task, depth, needles, kind, candidates)
    rng = random.Random(f"niah/{task}/{kind}/{needles}/{seed}")  # the needles: the same in every cell
    header, texts, asked = _spec(task, rng, needles, kind)
    values = {v for _, answers, others in asked for v in (*answers, *others)}
    fresh = _distinct(rng, _value_maker(task, kind, rng), candidates - 1, exclude=values)
    queries = [make_query(tokenizer, q, answers, [*others, *fresh][: candidates - 1]) for q, answers, others in asked]
    rng = random.Random(f"niah/{task}/{kind}/{needles}/{seed}/{length}/{depth}")  # where they go
    depths = [depth] + [rng.random() for _ in texts[1:]]
    meta = {"task": task, "length": length, "depth": depth, "seed": seed, "haystack": haystack.name, "kind": kind}
    return assemble(tokenizer, header, texts, depths, queries, haystack, length, rng, meta)


def _spec(task: str, rng: random.Random, n: int, kind: str) -> tuple[str, list[str], list[tuple[str, list, list]]]:
    """header, needle texts, and per query (question + answer prefix, answers, in-text wrong values)."""
    if task == "passkey":
        v = str(rng.randint(10_000, 99_999))
        needle = f"The pass key is {v}. Remember it. {v} is the pass key."
        return PASSKEY_HEADER, [needle], [("What is the pass key? The pass key is", [v], [])]
    count = 1 if task == "single" else n
    keys = _distinct(rng, lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", 1 if task == "multivalue" else count)
    values = _distinct(rng, _value_maker(task, kind, rng), count)
    keys = keys * count if task == "multivalue" else keys
    noun = kind
    texts = [f"One of the special magic {noun}s for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
    header = (f"Some special magic {noun}s are hidden within the following text. Make sure to memorize it. "
              f"I will quiz you about the {noun}s afterwards.")  # fmt: skip
    if task == "multivalue":
        about = f"special magic {noun}s for {keys[0]} mentioned in the provided text"
        return header, texts, [(f"What are all the {about}? The {about} are", values, [])]
    about = [f"special magic {noun} for {k} mentioned in the provided text" for k in keys]
    asked = range(count) if task == "multiquery" else range(1)
    others = [[v for j, v in enumerate(values) if j != i] for i in asked]
    return header, texts, [(f"What is the {about[i]}? The {about[i]} is", [values[i]], others[i]) for i in asked]


def _value_maker(task: str, kind: str, rng: random.Random) -> Callable[[], str]:
    if task == "passkey":
        return lambda: str(rng.randint(10_000, 99_999))
    if kind == "number":
        return lambda: str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return lambda: rng.choice(NOUNS)
    return lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(rng: random.Random, make: Callable[[], str], n: int, exclude: set[str] | None = None) -> list[str]:
    """`n` distinct values from `make`, none in `exclude` (stops early if the supply runs out)."""
    out: list[str] = []
    seen = set(exclude or ())
    for _ in range(1000 * max(n, 1)):
        if len(out) == n:
            break
        v = make()
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _check(task: str, depth: float, needles: int, kind: str, candidates: int) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown NIAH task {task!r}; choose one of {', '.join(TASKS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown value kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1], got {depth}")
    if needles < 1 or (task in ("multikey", "multiquery", "multivalue") and needles < 2):
        raise ValueError(f"{task} needs at least 2 needles, got {needles}")
    if candidates < 2:
        raise ValueError(f"candidates must be at least 2 (the value and one wrong value), got {candidates}")
