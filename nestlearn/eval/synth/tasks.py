"""Synthetic recall tasks as batches of token ids: MQAR (Zoology / Based) and five MAD tasks (Poli et al. 2024).

What this is: `Batch` (inputs, targets, scored mask), the `Task` base every synthetic task shares (its vocabulary,
the ids an answer can take, admissible lengths, training and test length bins, `sample`), the recall tasks
`MQAR`, `InContextRecall`, `FuzzyRecall`, `SelectiveCopy`, `Memorization`, `Compression`, and the state-size report
(`state_bytes`, `state_report`: bytes of a model's learning state per sequence). Every task is a frozen dataclass
of its parameters; `sample(batch, length, gen)` is deterministic given the state of the `torch.Generator`, and
every row of one batch has the same length (no padding: a batch is one length drawn from a bin).
What it is not: the formal languages (`formal.py`), the task registry (`__init__.py`), training or scoring
(`run.py`), or a data loader.

Conventions. `targets[b, t]` is what the model's output at position `t` is trained to give: for a next-token task
the token that follows (or the answer to the query at `t`), IGNORE (-100) where nothing is trained. `mask[b, t]`
marks the scored positions, always a subset of `targets != IGNORE`. Accuracy = argmax of the output at a scored
position equals its target. Chance = `1 / len(task.answers)`: a predictor that guesses uniformly among the ids an
answer can take. A task with `readout == "last"` (compression) is scored from the model's final position only:
its targets are a reconstruction of the whole input, decoded from that one state (see `Compression`).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from ...fields import coerce_fields

IGNORE = -100
Readout = Literal["next", "last"]
Metric = Literal["token", "sequence"]
Bin = tuple[int, int]


class Batch(NamedTuple):
    """One batch; every row has the same length T.

    inputs `[B, T]` int64: the ids the model reads. targets `[B, T]` int64: what the output at each position is
    trained to give (IGNORE where nothing is trained). mask `[B, T]` bool: the scored positions."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor


@dataclass(frozen=True, kw_only=True)
class Task:
    """A synthetic task; subclasses set the class attributes and implement `vocab_size`, `answers`,
    `min_length` and `sample`.

    `seq_len`: the longest training length. Tasks with `fixed_length` train at exactly `seq_len` (their papers'
    setting); the others (formal languages) train on every admissible length up to it. Test bins: the training
    bin, then `seq_len + 1 .. 2 seq_len` and `2 seq_len + 1 .. 4 seq_len`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    readout: ClassVar[Readout] = "next"
    headline: ClassVar[Metric] = "token"
    fixed_length: ClassVar[bool] = True

    seq_len: int = 64

    def __post_init__(self) -> None:
        try:
            coerce_fields(self)  # '8' from the command line is an int
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("seed"):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{self.name}: {f.name} must be a positive int, got {value}")
        self.check()
        if not self.admissible_lengths(*self.train_bin()):
            raise ValueError(
                f"{self.name}: seq_len = {self.seq_len} cannot be a training length with these settings "
                f"({self.length_rule()}); choose another seq_len"
            )

    def check(self) -> None:
        """Refuse parameters that do not make a task (ValueError naming the fix)."""

    @property
    def vocab_size(self) -> int:
        """Ids `0 .. vocab_size - 1` (the model's vocabulary)."""
        raise NotImplementedError

    @property
    def answers(self) -> tuple[int, ...]:
        """Every id a scored target can take."""
        raise NotImplementedError

    @property
    def chance(self) -> float:
        """Token accuracy of a predictor that guesses uniformly among `answers`."""
        return 1.0 / len(self.answers)

    @property
    def min_length(self) -> int:
        raise NotImplementedError

    def admissible(self, length: int) -> bool:
        """Whether a row can have this length (e.g. a^n b^n needs an even one)."""
        return length >= self.min_length

    def admissible_lengths(self, lo: int, hi: int) -> list[int]:
        return [n for n in range(max(lo, 1), hi + 1) if self.admissible(n)]

    def train_bin(self) -> Bin:
        return (self.seq_len, self.seq_len) if self.fixed_length else (1, self.seq_len)

    def test_bins(self) -> list[Bin]:
        n = self.seq_len
        return [self.train_bin(), (n + 1, 2 * n), (2 * n + 1, 4 * n)]

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        """`batch` rows of `length` tokens, drawn with `gen`."""
        raise NotImplementedError

    def args(self) -> dict[str, Any]:
        """The parameters, as `make_task(name, **args)` takes them."""
        return dataclasses.asdict(self)

    def check_length(self, length: int) -> None:
        if not self.admissible(length):
            raise ValueError(f"{self.name} cannot make a row of length {length}: {self.length_rule()}")

    def length_rule(self) -> str:
        return f"lengths start at {self.min_length}"


# ---------------------------------------------------------------------------------------------
# sampling helpers


def distinct(batch: int, n: int, k: int, gen: torch.Generator) -> Tensor:
    """k distinct integers of `0 .. n-1` per row, in random order. -> `[batch, k]` int64."""
    return torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :k]


def randint(lo: int, hi: int, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Uniform ints in `lo .. hi - 1`. -> int64 tensor of `shape`."""
    return torch.randint(lo, hi, shape, generator=gen)


def python_rng(gen: torch.Generator) -> random.Random:
    """A Python RNG seeded from `gen` (for row-by-row generators: one draw of `gen` per row)."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))


def only_answers(inputs: Tensor, targets: Tensor) -> Batch:
    """A batch that trains exactly on its scored positions."""
    return Batch(inputs, targets, targets != IGNORE)


# ---------------------------------------------------------------------------------------------
# MQAR


@dataclass(frozen=True, kw_only=True)
class MQAR(Task):
    """Multi-query associative recall (Arora et al. 2023, Zoology; Based).

    Vocabulary (`vocab` ids): 0 fills the query region; keys `1 .. vocab/2 - 1`; values `vocab/2 .. vocab - 1`.
    A row: `n_pairs` key-value pairs `k_1 v_1 ... k_n v_n` (distinct keys, distinct values), then a query region
    of 0s (Zoology's `random_non_queries=False`) holding `n_queries` of the keys (a random subset, default all
    of them as in Zoology, each once), each followed by its value, at pair-aligned slots drawn without
    replacement with weight `slot ** (power_a - 1)` (Zoology's power law: 0.01 puts most queries near the pairs,
    1.0 anywhere). Predicted: at each query key, its value (which then follows in the input, as in Zoology).
    Scored and trained: those positions only. Length: the row length (`>= 2 n_pairs + 2 n_queries`)."""

    name: ClassVar[str] = "mqar"
    summary: ClassVar[str] = "multi-query associative recall: key-value pairs, then queries of a subset of keys"
    vocab: int = 64
    n_pairs: int = 8
    n_queries: int | None = None
    power_a: float = 0.01

    @property
    def queries(self) -> int:
        return self.n_pairs if self.n_queries is None else self.n_queries

    def check(self) -> None:
        if self.vocab < 4 or self.vocab // 2 - 1 < self.n_pairs:
            raise ValueError(
                f"mqar: vocab = {self.vocab} holds {max(self.vocab // 2 - 1, 0)} keys, fewer than n_pairs = "
                f"{self.n_pairs}; use vocab >= {2 * self.n_pairs + 2}"
            )
        if not self.power_a > 0:
            raise ValueError(f"mqar: power_a must be > 0 (1.0: queries anywhere), got {self.power_a}")
        if self.queries > self.n_pairs:
            raise ValueError(f"mqar: n_queries = {self.queries} exceeds n_pairs = {self.n_pairs}; queries are keys")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def answers(self) -> tuple[int, ...]:
        return tuple(range(self.vocab // 2, self.vocab))

    @property
    def min_length(self) -> int:
        return 2 * self.n_pairs + 2 * self.queries

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        self.check_length(length)
        n, q, half = self.n_pairs, self.queries, self.vocab // 2
        keys = distinct(batch, half - 1, n, gen) + 1  # [B, n]
        values = distinct(batch, self.vocab - half, n, gen) + half  # [B, n]
        inputs = torch.zeros(batch, length, dtype=torch.long)
        inputs[:, 0 : 2 * n : 2], inputs[:, 1 : 2 * n : 2] = keys, values
        which = distinct(batch, n, q, gen)  # [B, q] the queried pairs
        slots = torch.arange(1, (length - 2 * n) // 2 + 1, dtype=torch.float64) ** (self.power_a - 1)
        pos = 2 * n + 2 * torch.multinomial(slots.expand(batch, -1), q, generator=gen)  # [B, q] query positions
        asked, answer = keys.gather(1, which), values.gather(1, which)
        inputs.scatter_(1, pos, asked).scatter_(1, pos + 1, answer)
        targets = torch.full_like(inputs, IGNORE).scatter_(1, pos, answer)
        return only_answers(inputs, targets)


# ---------------------------------------------------------------------------------------------
# the MAD tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures", §3 and App. B)


class _KeysValuesMarker:
    """MAD's vocabulary layout shared by in-context recall and memorisation: keys `0 .. K-1` with
    `K = (vocab-1)//2`, values `K .. vocab-2`, one marker id `vocab-1`."""

    vocab: int

    @property
    def keys(self) -> int:
        return (self.vocab - 1) // 2

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def answers(self) -> tuple[int, ...]:
        return tuple(range(self.keys, self.vocab - 1))


@dataclass(frozen=True, kw_only=True)
class InContextRecall(_KeysValuesMarker, Task):
    """MAD in-context recall.

    Reading: a row is a stream of key-value pairs whose keys repeat; each key is bound to one value for the
    whole row (drawn when it first appears), then a copy prefix and a final probe: one of the keys shown,
    followed by its value. Vocabulary (MAD's layout, `vocab` ids): keys `0 .. K-1` with `K = (vocab-1)//2`,
    values `K .. vocab-2`, copy prefix `vocab-1`. Trained: every next token (MAD trains on the shifted row).
    Scored: every value whose key appeared earlier in the row, the final probe included (MAD's test set scores
    only the probe; its `multi_query` option scores every repeat, as here). Length: the row length, even, >= 4."""

    name: ClassVar[str] = "in_context_recall"
    summary: ClassVar[str] = "MAD in-context recall: key-value stream, recall the value bound to a repeated key"
    vocab: int = 16

    def check(self) -> None:
        if self.vocab < 4:
            raise ValueError(f"in_context_recall: vocab must be >= 4 (keys, values, copy prefix), got {self.vocab}")

    @property
    def min_length(self) -> int:
        return 4

    def admissible(self, length: int) -> bool:
        return length >= 4 and length % 2 == 0

    def length_rule(self) -> str:
        return "lengths are even and at least 4"

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        self.check_length(length)
        K, m = self.keys, length // 2 - 1
        keys = randint(0, K, (batch, m), gen)  # [B, m]
        table = randint(K, self.vocab - 1, (batch, K), gen)  # [B, K] each key's value in this row
        present = torch.zeros(batch, K).scatter_(1, keys, 1.0)
        probe = torch.multinomial(present, 1, generator=gen)  # [B, 1] uniform over the keys shown
        prefix = torch.full((batch, 1), self.vocab - 1)
        pairs = torch.stack([keys, table.gather(1, keys)], dim=-1).reshape(batch, 2 * m)
        row = torch.cat([pairs, prefix, probe, table.gather(1, probe)], dim=1)  # [B, length + 1]
        repeat = (keys[:, :, None] == keys[:, None, :]).tril(-1).any(-1)  # [B, m] key seen before
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[:, 0 : 2 * m : 2] = repeat
        mask[:, -1] = True
        return Batch(row[:, :-1], row[:, 1:], mask)


@dataclass(frozen=True, kw_only=True)
class FuzzyRecall(Task):
    """MAD fuzzy in-context recall.

    Reading: keys and values are spans of 1 to `k_motif` (keys) or `v_motif` (values) tokens (distinct tokens
    within a span), so the model must find where a key ends before it can recall. A row: left padding, a
    stream of key-value span pairs (a key span keeps its value span within the row), one of them the probe
    pair (a key of the full `k_motif` tokens, as MAD's test probes), then a copy prefix, the probe key and
    its value. Vocabulary (MAD's layout): keys `0 .. K-1` with `K = (vocab-2)//2`, values `K .. 2K-1`, pad
    `vocab-2`, copy prefix `vocab-1`. Trained: every next token that is not padding. Scored: the probe's value
    tokens after the copy prefix (the first one predicted at the last key token). Length: the row length,
    >= 2 (k_motif + v_motif)."""

    name: ClassVar[str] = "fuzzy_recall"
    summary: ClassVar[str] = "MAD fuzzy recall: keys and values are multi-token spans; recall the probe's value"
    vocab: int = 16
    k_motif: int = 3
    v_motif: int = 3

    def check(self) -> None:
        if (self.vocab - 2) // 2 < max(self.k_motif, self.v_motif):
            raise ValueError(
                f"fuzzy_recall: vocab = {self.vocab} gives {(self.vocab - 2) // 2} key and value ids, fewer than a "
                f"span of {max(self.k_motif, self.v_motif)} distinct ids; use vocab >= "
                f"{2 * max(self.k_motif, self.v_motif) + 2}"
            )

    @property
    def keys(self) -> int:
        return (self.vocab - 2) // 2

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def answers(self) -> tuple[int, ...]:
        return tuple(range(self.keys, 2 * self.keys))

    @property
    def min_length(self) -> int:
        return 2 * (self.k_motif + self.v_motif)

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        self.check_length(length)
        rows, spans = zip(*(self.row(length, python_rng(gen)) for _ in range(batch)), strict=True)
        full = torch.tensor(rows)  # [B, length + 1]
        inputs, nxt = full[:, :-1], full[:, 1:]
        targets = nxt.masked_fill(nxt == self.vocab - 2, IGNORE)
        mask = torch.arange(length)[None, :] >= length - torch.tensor(spans)[:, None]
        return Batch(inputs, targets, mask)

    def row(self, length: int, rng: random.Random) -> tuple[list[int], int]:
        """One row of `length + 1` tokens (before the shift) and the probe value's span length."""
        K = self.keys
        key_ids, value_ids = range(K), range(K, 2 * K)

        def span(ids: range, most: int) -> tuple[int, ...]:
            return tuple(rng.sample(ids, rng.randint(1, most)))

        probe_key = tuple(rng.sample(key_ids, self.k_motif))
        probe_value = span(value_ids, self.v_motif)
        table = {probe_key: probe_value}
        budget = length + 1 - 2 * (len(probe_key) + len(probe_value)) - 1
        pairs: list[tuple[int, ...]] = []
        while True:
            k = span(key_ids, self.k_motif)
            v = table.setdefault(k, span(value_ids, self.v_motif))
            if len(k) + len(v) > budget:
                break
            pairs.append(k + v)
            budget -= len(k) + len(v)
        pairs.insert(rng.randint(0, len(pairs)), probe_key + probe_value)
        seq = [t for p in pairs for t in p] + [self.vocab - 1, *probe_key, *probe_value]
        return [self.vocab - 2] * (length + 1 - len(seq)) + seq, len(probe_value)


@dataclass(frozen=True, kw_only=True)
class SelectiveCopy(Task):
    """MAD selective copying.

    Reading: `n_copy` content tokens scattered among blank tokens, then a copy token, then `n_copy` blanks at
    whose positions the model writes the content tokens in their order (the inputs there stay blank: no
    teacher forcing). Vocabulary (MAD's layout): content `0 .. vocab-3`, blank `vocab-2`, copy `vocab-1`.
    Content positions: a uniform random subset of the first `length - n_copy - 1` positions (MAD inserts blanks at
    random indices). Trained and scored: the last `n_copy` positions. Length: the row length, >= 2 n_copy + 1."""

    name: ClassVar[str] = "selective_copy"
    summary: ClassVar[str] = "MAD selective copying: copy the content tokens scattered among blanks, in order"
    vocab: int = 16
    n_copy: int = 8

    def check(self) -> None:
        if self.vocab < 3:
            raise ValueError(f"selective_copy: vocab must be >= 3 (content, blank, copy), got {self.vocab}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def answers(self) -> tuple[int, ...]:
        return tuple(range(self.vocab - 2))

    @property
    def min_length(self) -> int:
        return 2 * self.n_copy + 1

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        self.check_length(length)
        n = self.n_copy
        content = randint(0, self.vocab - 2, (batch, n), gen)
        pos = distinct(batch, length - n - 1, n, gen).sort(dim=1).values
        inputs = torch.full((batch, length), self.vocab - 2).scatter_(1, pos, content)
        inputs[:, length - n - 1] = self.vocab - 1
        targets = torch.full_like(inputs, IGNORE)
        targets[:, length - n :] = content
        return only_answers(inputs, targets)


@dataclass(frozen=True, kw_only=True)
class Memorization(_KeysValuesMarker, Task):
    """MAD memorization.

    Reading: one fixed key -> value map (a fact base, the same for every row, drawn from `map_seed`, not from the
    sampling seed) that the model can only learn into its weights. A row: `key insert key insert ...`; at each
    insert token the model gives the value of the key before it. Vocabulary (MAD's layout): keys `0 .. K-1`
    with `K = (vocab-1)//2`, values `K .. vocab-2`, insert `vocab-1`; the map sends the K keys to K distinct
    values. Trained and scored: the insert positions. Length: the row length, even."""

    name: ClassVar[str] = "memorization"
    summary: ClassVar[str] = "MAD memorization: recall the values of a fixed key-value map (facts in the weights)"
    vocab: int = 64
    seq_len: int = 32
    map_seed: int = 12345

    def check(self) -> None:
        if self.vocab < 3:
            raise ValueError(f"memorization: vocab must be >= 3 (keys, values, insert), got {self.vocab}")

    @property
    def facts(self) -> Tensor:
        """The map: `facts[k]` is key k's value. -> `[K]` int64."""
        gen = torch.Generator().manual_seed(self.map_seed)
        return torch.randperm(self.vocab - 1 - self.keys, generator=gen)[: self.keys] + self.keys

    @property
    def min_length(self) -> int:
        return 2

    def admissible(self, length: int) -> bool:
        return length >= 2 and length % 2 == 0

    def length_rule(self) -> str:
        return "lengths are even"

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        self.check_length(length)
        keys = randint(0, self.keys, (batch, length // 2), gen)
        insert = torch.full_like(keys, self.vocab - 1)
        inputs = torch.stack([keys, insert], dim=-1).reshape(batch, length)
        answers = torch.stack([torch.full_like(keys, IGNORE), self.facts[keys]], dim=-1)
        return only_answers(inputs, answers.reshape(batch, length))


@dataclass(frozen=True, kw_only=True)
class Compression(Task):
    """MAD compression.

    Reading: `length - 1` random tokens and a compression token; the model must hold the whole row in the one
    state at the compression token, from which a small decoder (MAD's: an MLP on that state plus a sinusoidal
    embedding of the position asked for; `run.Decoder`) rebuilds every token. `readout == "last"`: targets are
    not next tokens but `targets[b, t]` = the token at position t, decoded from the final position's state.
    Vocabulary (MAD's layout): content `0 .. vocab-2`, compression token `vocab-1`. Trained and scored: every
    content position. Length: the row length, >= 2."""

    name: ClassVar[str] = "compression"
    summary: ClassVar[str] = "MAD compression: rebuild the whole row from the state at its last token"
    readout: ClassVar[Readout] = "last"
    vocab: int = 16
    seq_len: int = 32

    def check(self) -> None:
        if self.vocab < 2:
            raise ValueError(f"compression: vocab must be >= 2 (content, compression token), got {self.vocab}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def answers(self) -> tuple[int, ...]:
        return tuple(range(self.vocab - 1))

    @property
    def min_length(self) -> int:
        return 2

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        self.check_length(length)
        inputs = randint(0, self.vocab - 1, (batch, length), gen)
        inputs[:, -1] = self.vocab - 1
        targets = inputs.clone()
        targets[:, -1] = IGNORE
        return only_answers(inputs, targets)


RECALL_TASKS: dict[str, type[Task]] = {
    t.name: t for t in (MQAR, InContextRecall, FuzzyRecall, SelectiveCopy, Memorization, Compression)
}


# ---------------------------------------------------------------------------------------------
# state size


def tree_bytes(tree: Any) -> int:
    """Bytes of every tensor in a tree of tuples / lists / dicts / NamedTuples."""
    if isinstance(tree, Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tree_bytes(v) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return sum(tree_bytes(v) for v in tree)
    return 0


def state_bytes(model: Any) -> int:
    """Bytes of a model's learning state for one sequence before it reads anything: the tensors of
    `model.init_state(1)` (memories, momenta, short-convolution inputs, CMS fast weights). Attention caches
    are empty there and grow with every token read: see `state_report`."""
    return tree_bytes(model.init_state(1))


@torch.no_grad()
def state_report(model: Any, length: int) -> dict[str, Any]:
    """The state per sequence at the start and after reading `length` tokens (id 0), and whether it grows (an
    attention cache holds every token it attends to: full attention grows without bound, a sliding window
    up to the window)."""
    was_training = model.training
    model.eval()
    start = state_bytes(model)
    _, state = model(torch.zeros(1, length, dtype=torch.long, device=model.device))
    model.train(was_training)
    after = tree_bytes(state.blocks)  # not `pending`: the online CMS segment not yet learned (at most one segment)
    note = "constant size" if after == start else "grows with the tokens read (attention caches)"
    return {"initial_bytes": start, "after_bytes": after, "after_tokens": length, "grows": after != start,
            "note": note}  # fmt: skip
