"""Formal languages of the paper's Table 5 as next-token tasks: parity, (aa)*, (abab)*, a^n b^n, a^n b^n c^n and
shuffle-2, trained on short strings and tested on longer ones.

What this is: one `FormalTask` per language. A row is one string of the language (`length` symbols, no
beginning or end marker); the target at every position is a label id computed from the prefix read so far:
- parity: the parity of the number of 1s in the prefix (labels even / odd) over uniform random bits; the label
  at the last position is Deletang et al. (2023)'s "parity check" answer, the earlier ones its running form.
- (aa)*, (abab)*, a^n b^n, a^n b^n c^n, shuffle-2: the set of symbols that may come next ('$' = the string may
  end here), one label per possible set: the character-prediction task of Gers & Schmidhuber (2001) and
  Bhattamishra et al. (2020, "On the ability and limitations of Transformers to recognize formal languages"),
  whose languages, length splits and all-positions-right scoring the paper's Table 5 follows (membership
  classification would need negative strings and gives one bit per string; the next-set labels test the
  counter or state at every step, and a string whose every label is right is recognised).
Each row of a batch has the same length (a^n b^n: one string per length, so its rows are equal); every position
is scored; the headline metric is sequence accuracy (every label of the string right), token accuracy is
reported too. Vocabulary: the symbols at ids `0 .. k-1`, then the labels. Lengths: training 1 .. seq_len (the
admissible ones: a^n b^n even, a^n b^n c^n multiples of 3, (abab)* multiples of 4), test bins seq_len+1 .. 2
seq_len and 2 seq_len+1 .. 4 seq_len (defaults 64, 65-128, 129-256).
Every language also has its definition in plain Python (`is_prefix`, `member`, `valid_next`, `label`), which the
tests compare with the vectorised labels. What it is not: a membership classifier, a parser, or a sampler of
non-members.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .tasks import Batch, Metric, Task

END = "$"


@dataclass(frozen=True, kw_only=True)
class FormalTask(Task):
    """A language over `alphabet`; labels are the valid-next sets `sets` (parity overrides the labels)."""

    headline: ClassVar[Metric] = "sequence"
    fixed_length: ClassVar[bool] = False
    alphabet: ClassVar[str]
    sets: ClassVar[tuple[frozenset[str], ...]] = ()

    @property
    def label_names(self) -> tuple[str, ...]:
        order = self.alphabet + END
        return tuple("{" + ",".join(sorted(s, key=order.index)) + "}" for s in self.sets)

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + len(self.label_names)

    @property
    def answers(self) -> tuple[int, ...]:
        return tuple(range(len(self.alphabet), self.vocab_size))

    @property
    def min_length(self) -> int:
        return 1

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        self.check_length(length)
        words, labels = self.words(batch, length, gen)
        return Batch(words, labels + len(self.alphabet), torch.ones(batch, length, dtype=torch.bool))

    def words(self, batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Strings `[B, L]` (symbol ids) and the label index after each prefix `[B, L]`."""
        raise NotImplementedError

    # the definition in plain Python (for reading and for the tests)

    @staticmethod
    def is_prefix(word: str) -> bool:
        """Whether `word` begins some string of the language."""
        raise NotImplementedError

    @staticmethod
    def member(word: str) -> bool:
        raise NotImplementedError

    def valid_next(self, prefix: str) -> frozenset[str]:
        """The symbols that may follow `prefix`, with '$' when `prefix` is itself a member."""
        nxt = {c for c in self.alphabet if self.is_prefix(prefix + c)}
        return frozenset(nxt | ({END} if self.member(prefix) else set()))

    def label(self, prefix: str) -> int:
        """The label index (not id) the task asks for after `prefix`."""
        return self.sets.index(self.valid_next(prefix))

    def text(self, ids: Tensor) -> str:
        """Symbol ids `[L]` as a string."""
        return "".join(self.alphabet[i] for i in ids.tolist())


def positions(batch: int, length: int) -> Tensor:
    """Prefix lengths 1 .. L per position. -> `[batch, L]` int64."""
    return torch.arange(1, length + 1).expand(batch, length)


@dataclass(frozen=True, kw_only=True)
class Parity(FormalTask):
    """Uniform random bits; label after each prefix: even (0) or odd (1) number of 1s."""

    name: ClassVar[str] = "parity"
    summary: ClassVar[str] = "parity of the 1s read so far, at every position (random bits)"
    alphabet: ClassVar[str] = "01"

    @property
    def label_names(self) -> tuple[str, ...]:
        return ("even", "odd")

    def words(self, batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        bits = torch.randint(0, 2, (batch, length), generator=gen)
        return bits, bits.cumsum(dim=1) % 2

    @staticmethod
    def is_prefix(word: str) -> bool:
        return set(word) <= {"0", "1"}

    @staticmethod
    def member(word: str) -> bool:
        """The language Parity: an even number of 1s."""
        return Parity.is_prefix(word) and word.count("1") % 2 == 0

    def label(self, prefix: str) -> int:
        return prefix.count("1") % 2


@dataclass(frozen=True, kw_only=True)
class AAStar(FormalTask):
    """(aa)*: a^L for even L; after a^p the next is a, and the end when p is even."""

    name: ClassVar[str] = "aa_star"
    summary: ClassVar[str] = "(aa)*: valid next symbols after each prefix of a^2n"
    alphabet: ClassVar[str] = "a"
    sets: ClassVar[tuple[frozenset[str], ...]] = (frozenset("a$"), frozenset("a"))

    def admissible(self, length: int) -> bool:
        return length >= 2 and length % 2 == 0

    def length_rule(self) -> str:
        return "(aa)* strings have even lengths"

    def words(self, batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.zeros(batch, length, dtype=torch.long), positions(batch, length) % 2

    @staticmethod
    def is_prefix(word: str) -> bool:
        return set(word) <= {"a"}

    @staticmethod
    def member(word: str) -> bool:
        return AAStar.is_prefix(word) and len(word) % 2 == 0


@dataclass(frozen=True, kw_only=True)
class ABABStar(FormalTask):
    """(abab)*: (abab)^n; after a prefix of length p the next is a (and the end) when p % 4 == 0, b when p is odd,
    a when p % 4 == 2."""

    name: ClassVar[str] = "abab_star"
    summary: ClassVar[str] = "(abab)*: valid next symbols after each prefix of (abab)^n"
    alphabet: ClassVar[str] = "ab"
    sets: ClassVar[tuple[frozenset[str], ...]] = (frozenset("a$"), frozenset("a"), frozenset("b"))

    def admissible(self, length: int) -> bool:
        return length >= 4 and length % 4 == 0

    def length_rule(self) -> str:
        return "(abab)* strings have lengths that are multiples of 4"

    def words(self, batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        words = (torch.arange(length) % 2).expand(batch, length)
        return words, torch.tensor([0, 2, 1, 2])[positions(batch, length) % 4]

    @staticmethod
    def is_prefix(word: str) -> bool:
        return word == ("ab" * len(word))[: len(word)]

    @staticmethod
    def member(word: str) -> bool:
        return ABABStar.is_prefix(word) and len(word) % 4 == 0


@dataclass(frozen=True, kw_only=True)
class AnBn(FormalTask):
    """a^n b^n (n >= 1): after a^p: {a, b}; inside the b's: {b}; at the end: {$}."""

    name: ClassVar[str] = "anbn"
    summary: ClassVar[str] = "a^n b^n: valid next symbols after each prefix (a counter)"
    alphabet: ClassVar[str] = "ab"
    sets: ClassVar[tuple[frozenset[str], ...]] = (frozenset("ab"), frozenset("b"), frozenset("$"))

    def admissible(self, length: int) -> bool:
        return length >= 2 and length % 2 == 0

    def length_rule(self) -> str:
        return "a^n b^n strings have even lengths"

    def words(self, batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, p = length // 2, positions(batch, length)
        words = (torch.arange(length) >= n).long().expand(batch, length)
        return words, (p > n).long() + (p == 2 * n).long()

    @staticmethod
    def is_prefix(word: str) -> bool:
        m = re.fullmatch(r"(a*)(b*)", word)
        return m is not None and len(m[2]) <= len(m[1])

    @staticmethod
    def member(word: str) -> bool:
        m = re.fullmatch(r"(a+)(b+)", word)
        return m is not None and len(m[1]) == len(m[2])


@dataclass(frozen=True, kw_only=True)
class AnBnCn(FormalTask):
    """a^n b^n c^n (n >= 1): after a^p: {a, b}; inside the b's: {b}; from a^n b^n on: {c}; at the end: {$}."""

    name: ClassVar[str] = "anbncn"
    summary: ClassVar[str] = "a^n b^n c^n: valid next symbols after each prefix (two counters)"
    alphabet: ClassVar[str] = "abc"
    sets: ClassVar[tuple[frozenset[str], ...]] = (frozenset("ab"), frozenset("b"), frozenset("c"), frozenset("$"))

    def admissible(self, length: int) -> bool:
        return length >= 3 and length % 3 == 0

    def length_rule(self) -> str:
        return "a^n b^n c^n strings have lengths that are multiples of 3"

    def words(self, batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, p = length // 3, positions(batch, length)
        words = (torch.arange(length) // n).expand(batch, length)
        return words, (p > n).long() + (p >= 2 * n).long() + (p == 3 * n).long()

    @staticmethod
    def is_prefix(word: str) -> bool:
        m = re.fullmatch(r"(a*)(b*)(c*)", word)
        if m is None:
            return False
        i, j, k = (len(g) for g in m.groups())
        return j <= i if k == 0 else (j == i and k <= i)

    @staticmethod
    def member(word: str) -> bool:
        m = re.fullmatch(r"(a+)(b+)(c+)", word)
        return m is not None and len(m[1]) == len(m[2]) == len(m[3])


@dataclass(frozen=True, kw_only=True)
class Shuffle2(FormalTask):
    """Shuffle-2: the shuffle of two Dyck-1 languages, '()' and '[]' (each kind balanced on its own, kinds may
    interleave: '([)]' is a member). Strings are drawn by a random walk that picks uniformly among the moves that
    can still end balanced at the row's length. Labels: '(' and '[' may always come next; ')' when a '(' is
    open, ']' when a '[' is open, '$' when nothing is open."""

    name: ClassVar[str] = "shuffle2"
    summary: ClassVar[str] = "shuffle-2 (two interleaved Dyck-1 languages): valid next symbols after each prefix"
    alphabet: ClassVar[str] = "()[]"
    sets: ClassVar[tuple[frozenset[str], ...]] = (
        frozenset("([$"),
        frozenset("([)"),
        frozenset("([]"),
        frozenset("([)]"),
    )

    def admissible(self, length: int) -> bool:
        return length >= 2 and length % 2 == 0

    def length_rule(self) -> str:
        return "shuffle-2 strings have even lengths"

    def words(self, batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        depth = torch.zeros(batch, 2, dtype=torch.long)  # open '(' and '['
        words, labels = [], []
        for t in range(length):
            can_open = (depth.sum(1) + 1 <= length - t - 1).float()
            allowed = torch.stack([can_open, (depth[:, 0] > 0).float(), can_open, (depth[:, 1] > 0).float()], 1)
            move = torch.multinomial(allowed, 1, generator=gen)[:, 0]  # ids: ( ) [ ]
            kind, sign = move // 2, 1 - 2 * (move % 2)
            depth = depth.scatter_add(1, kind[:, None], sign[:, None])
            words.append(move)
            labels.append((depth[:, 0] > 0).long() + 2 * (depth[:, 1] > 0).long())
        return torch.stack(words, 1), torch.stack(labels, 1)

    @staticmethod
    def is_prefix(word: str) -> bool:
        depth = {"(": 0, "[": 0}
        for c in word:
            if c in "([":
                depth[c] += 1
            elif c in ")]":
                depth["(" if c == ")" else "["] -= 1
                if min(depth.values()) < 0:
                    return False
            else:
                return False
        return True

    @staticmethod
    def member(word: str) -> bool:
        return Shuffle2.is_prefix(word) and word.count("(") == word.count(")") and word.count("[") == word.count("]")


FORMAL_TASKS: dict[str, type[Task]] = {t.name: t for t in (Parity, AAStar, ABABStar, AnBn, AnBnCn, Shuffle2)}
