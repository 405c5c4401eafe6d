"""Synthetic tasks (`nestlearn.eval.synth`): the generators, their scoring, and `nestlearn synth train|eval|list`.

- Every task's generator is deterministic per seed (same seed, same batch; another seed, another batch) and
  keeps its layout: ids inside the vocabulary, targets at scored positions among the task's answers.
- An ORACLE predictor (the generator's own targets) scores 100 % on every task and bin, and the answers can be
  recomputed from the inputs alone (a solver per task: the value bound to the key, the content before the copy
  token, the fixed map, the valid-next set from the language's plain-Python definition), so nothing is
  scored that the input does not determine.
- A UNIFORM predictor (an id drawn uniformly from the task's answers, independently of the target) scores chance
  1/|answers|: each scored position is then right with probability p exactly, so with N positions the count
  right is Binomial(N, p); with N >= 20,000 (fuzzy recall 5,000) the accuracy stays within 5 standard deviations
  sqrt(p (1-p) / N) of p (a false alarm once in 1.7 million draws; the seed is fixed, so the test is
  deterministic).
- Hand-made cases for each formal language: members and non-members, valid-next sets, known parities.
- Length bins: every drawn length lies in its bin and is admissible; a bin without an admissible length and a
  length the task cannot make are refused.
- The state-size report: attention caches grow with the tokens read, a recurrent state does not.
- End to end: `synth train` then `synth eval` of compression (read from the last state through the decoder) for
  Transformer++ and HOPE, a few seconds each; eval reproduces the training report's numbers.
- Bad input (unknown task, variant, parameter, KEY=VALUE, bins, checkpoint, task mismatch): one line on stderr
  naming the choices, exit status 2.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator

import pytest
import torch

from nestlearn.eval.synth import IGNORE, TASKS, Batch, FormalTask, Task, make_task, state_report
from nestlearn.eval.synth.command import main
from nestlearn.eval.synth.formal import AAStar, ABABStar, AnBn, AnBnCn, Parity, Shuffle2
from nestlearn.eval.synth.run import SMALL, check_bins, pick_length, score, spread_lengths
from nestlearn.eval.synth.tasks import FuzzyRecall, Memorization
from nestlearn.models import CausalLM, preset
from nestlearn.models.config import fields_for
from tests.eval.conftest import one_line_error as nestlearn_error

NAMES = list(TASKS)
RANDOM = [n for n in NAMES if n not in ("aa_star", "abab_star", "anbn", "anbncn")]  # one string per length


def draw(task: Task, bin_: tuple[int, int], seed: int, batch: int = 8) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return task.sample(batch, pick_length(task, bin_, gen), gen)


def predictions_of(batch: Batch, values: torch.Tensor) -> torch.Tensor:
    """Predicted ids `[B, T]`: `values` at the scored positions, 0 elsewhere."""
    return torch.where(batch.mask, values, torch.zeros_like(values))


# ---------------------------------------------------------------------------------------------
# generators


@pytest.mark.parametrize("name", NAMES)
def test_generator_is_deterministic_per_seed(name: str) -> None:
    task = make_task(name)
    a, b = draw(task, task.train_bin(), 3), draw(task, task.train_bin(), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    if name in RANDOM:
        c = draw(task, task.train_bin(), 4)
        assert a.inputs.shape != c.inputs.shape or not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", NAMES)
def test_layout_and_oracle(name: str) -> None:
    """Shapes and dtypes, ids in the vocabulary, scored targets among the answers, and the oracle at 100 %."""
    task = make_task(name)
    answers = torch.tensor(task.answers)
    for i, bin_ in enumerate(task.test_bins()):
        b = draw(task, bin_, i)
        B, T = b.inputs.shape
        assert b.targets.shape == b.mask.shape == (B, T) and b.mask.dtype == torch.bool
        assert b.inputs.dtype == b.targets.dtype == torch.int64
        assert int(b.inputs.min()) >= 0 and int(b.inputs.max()) < task.vocab_size
        assert bool(b.mask.any(dim=1).all()), "every row has a scored position"
        assert bool((b.targets[b.mask] != IGNORE).all()) and bool(torch.isin(b.targets[b.mask], answers).all())
        trained = b.targets[b.targets != IGNORE]
        assert int(trained.min()) >= 0 and int(trained.max()) < task.vocab_size
        oracle = score(predictions_of(b, b.targets), b)
        assert oracle.right == oracle.tokens > 0 and oracle.right_rows == oracle.rows == B


@pytest.mark.parametrize("name", NAMES)
def test_uniform_predictor_scores_chance(name: str) -> None:
    task = make_task(name)
    need = 5_000 if name == "fuzzy_recall" else 20_000
    gen, answers = torch.Generator().manual_seed(11), torch.tensor(task.answers)
    right = total = 0
    while total < need:
        b = task.sample(256, pick_length(task, task.train_bin(), gen), gen)
        guess = answers[torch.randint(len(answers), b.inputs.shape, generator=gen)]
        s = score(predictions_of(b, guess), b)
        right, total = right + s.right, total + s.tokens
    p = task.chance
    assert abs(right / total - p) <= 5 * math.sqrt(p * (1 - p) / total), (right / total, p, total)


# ---------------------------------------------------------------------------------------------
# the answers follow from the inputs


def solve_mqar(task: Task, b: Batch) -> torch.Tensor:
    n, out = task.n_pairs, torch.zeros_like(b.targets)
    for r, t in b.mask.nonzero().tolist():
        keys = b.inputs[r, 0 : 2 * n : 2].tolist()
        out[r, t] = b.inputs[r, 2 * keys.index(int(b.inputs[r, t])) + 1]
    return out


def solve_recall(task: Task, b: Batch) -> torch.Tensor:
    """The token after an earlier occurrence of the key at each scored position."""
    out = torch.zeros_like(b.targets)
    for r, t in b.mask.nonzero().tolist():
        row = b.inputs[r].tolist()
        out[r, t] = row[next(i for i in range(0, t - 1, 2) if row[i] == row[t]) + 1]
    return out


def solve_fuzzy(task: FuzzyRecall, b: Batch) -> torch.Tensor:
    """Split each row into key runs and value runs; the probe key (after the copy prefix) appears earlier as a
    run, and the run after it is the value."""
    out, prefix = torch.zeros_like(b.targets), task.vocab - 1
    for r in range(b.inputs.shape[0]):
        row = b.inputs[r].tolist()
        cut = row.index(prefix)
        runs = [(k, list(g)) for k, g in _runs(row[:cut], task.keys)]
        probe = row[cut + 1 : cut + 1 + task.k_motif]
        i = next(j for j, (kind, run) in enumerate(runs) if kind == "key" and run == probe)
        value = runs[i + 1][1]
        cols = b.mask[r].nonzero()[:, 0]
        out[r, cols] = torch.tensor(value)
    return out


def _runs(row: list[int], keys: int) -> Iterator[tuple[str, list[int]]]:
    kinds = ["key" if x < keys else "value" if x < 2 * keys else "pad" for x in row]
    i = 0
    for kind, group in itertools.groupby(kinds):
        n = len(list(group))
        yield kind, row[i : i + n]
        i += n


def solve_copy(task: Task, b: Batch) -> torch.Tensor:
    out = torch.zeros_like(b.targets)
    for r in range(b.inputs.shape[0]):
        content = [x for x in b.inputs[r, : -task.n_copy - 1].tolist() if x < task.vocab - 2]
        out[r, -task.n_copy :] = torch.tensor(content)
    return out


def solve_memorization(task: Memorization, b: Batch) -> torch.Tensor:
    return torch.roll(task.facts[b.inputs.clamp(max=task.keys - 1)], 1, dims=1)


def solve_formal(task: FormalTask, b: Batch) -> torch.Tensor:
    out = torch.zeros_like(b.targets)
    for r in range(b.inputs.shape[0]):
        word = task.text(b.inputs[r])
        assert task.member(word) or (isinstance(task, Parity) and task.is_prefix(word)), word  # parity: any bits
        labels = [task.label(word[: t + 1]) for t in range(len(word))]
        out[r] = torch.tensor(labels) + len(task.alphabet)
    return out


SOLVERS = {
    "mqar": solve_mqar,
    "in_context_recall": solve_recall,
    "fuzzy_recall": solve_fuzzy,
    "selective_copy": solve_copy,
    "memorization": solve_memorization,
    "compression": lambda task, b: b.inputs,
}


@pytest.mark.parametrize("name", NAMES)
def test_answers_follow_from_the_inputs(name: str) -> None:
    task = make_task(name)
    solve = SOLVERS.get(name, solve_formal)
    for i, bin_ in enumerate(task.test_bins()):
        b = draw(task, bin_, 20 + i, batch=4)
        assert torch.equal(b.targets[b.mask], solve(task, b)[b.mask]), bin_


def test_in_context_recall_scores_repeats_and_the_probe() -> None:
    task = make_task("in_context_recall", vocab=8)
    b = draw(task, (16, 16), 0, batch=64)
    assert bool(b.mask[:, -1].all()) and bool((b.inputs[:, -2] == task.vocab - 1).all())  # copy prefix, probe
    assert int(b.mask[:, :-1].sum()) > 0 and bool((b.targets != IGNORE).all())  # every next token is trained


def test_memorization_map_is_fixed_and_seeded() -> None:
    a, b = make_task("memorization"), make_task("memorization", map_seed=7)
    assert torch.equal(a.facts, make_task("memorization").facts) and not torch.equal(a.facts, b.facts)
    assert len(set(a.facts.tolist())) == a.keys and min(a.facts.tolist()) >= a.keys


# ---------------------------------------------------------------------------------------------
# formal languages by hand

MEMBERS = {
    Parity: (["", "0", "11", "1010", "0110"], ["1", "100", "1101", "abc"]),
    AAStar: (["", "aa", "aaaa"], ["a", "aaa", "ab", "b"]),
    ABABStar: (["", "abab", "abababab"], ["ab", "aba", "abba", "baba", "ababa"]),
    AnBn: (["ab", "aabb", "aaabbb"], ["", "a", "aab", "abb", "abab", "ba"]),
    AnBnCn: (["abc", "aabbcc", "aaabbbccc"], ["", "aabbc", "abcc", "aabcbc", "acb", "abcabc"]),
    Shuffle2: (["", "()", "([)]", "[(])", "(())[]", "[[]]"], ["(]", ")(", "(()", "([)", "]["]),
}
NEXT = {
    AAStar: {"a": "a", "aa": "a$"},
    ABABStar: {"a": "b", "ab": "a", "aba": "b", "abab": "a$"},
    AnBn: {"a": "ab", "aa": "ab", "aab": "b", "aabb": "$"},
    AnBnCn: {"aa": "ab", "aab": "b", "aabb": "c", "aabbc": "c", "aabbcc": "$"},
    Shuffle2: {"(": "([)", "([": "([)]", "([)": "([]", "([)]": "([$", "[": "([]"},
}


@pytest.mark.parametrize("cls", list(MEMBERS), ids=lambda c: c.name)
def test_formal_members_and_non_members(cls: type[FormalTask]) -> None:
    members, others = MEMBERS[cls]
    assert all(cls.member(w) for w in members) and not any(cls.member(w) for w in others)


@pytest.mark.parametrize("cls", list(NEXT), ids=lambda c: c.name)
def test_formal_valid_next_sets(cls: type[FormalTask]) -> None:
    task = cls(seq_len=12)
    for prefix, expected in NEXT[cls].items():
        assert task.valid_next(prefix) == frozenset(expected), prefix


def test_parity_by_hand() -> None:
    task = Parity(seq_len=8)
    assert [task.label("1101"[: i + 1]) for i in range(4)] == [1, 0, 0, 1]  # odd, even, even, odd
    assert task.label_names == ("even", "odd") and task.answers == (2, 3)
    b = task.sample(16, 8, torch.Generator().manual_seed(0))
    for word, labels in zip(b.inputs.tolist(), b.targets.tolist(), strict=True):
        assert labels == [2 + sum(word[: t + 1]) % 2 for t in range(8)]


def test_formal_strings_are_members_at_every_length() -> None:
    for cls in (AAStar, ABABStar, AnBn, AnBnCn, Shuffle2):
        task = cls(seq_len=24)
        for length in task.admissible_lengths(1, 24):
            b = task.sample(3, length, torch.Generator().manual_seed(length))
            assert all(task.member(task.text(row)) for row in b.inputs), (cls.name, length)


def test_shuffle2_interleaves_and_nests() -> None:
    """The random walk reaches interleavings ('([)]'-like) and depth > 1 of both kinds."""
    b = Shuffle2(seq_len=64).sample(64, 64, torch.Generator().manual_seed(0))
    words = [Shuffle2().text(r) for r in b.inputs]
    assert any(re.search(r"\([^)]*\[[^\]]*\)", w) for w in words)
    assert any("((" in w for w in words) and any("[[" in w for w in words)


# ---------------------------------------------------------------------------------------------
# lengths, parameters, state size


@pytest.mark.parametrize("name", NAMES)
def test_lengths_stay_in_their_bins(name: str) -> None:
    task = make_task(name, seq_len=32)
    gen = torch.Generator().manual_seed(0)
    for lo, hi in task.test_bins():
        for _ in range(20):
            n = pick_length(task, (lo, hi), gen)
            assert lo <= n <= hi and task.admissible(n)
        assert task.sample(2, n, gen).inputs.shape == (2, n)
        spread = spread_lengths(task, (lo, hi), 5)
        assert len(spread) == 5 and all(lo <= n <= hi and task.admissible(n) for n in spread)
        assert len(set(spread)) == min(5, len(task.admissible_lengths(lo, hi)))
    assert task.train_bin() == ((32, 32) if task.fixed_length else (1, 32))


def test_inadmissible_lengths_and_bins_are_refused() -> None:
    with pytest.raises(ValueError, match="even lengths"):
        make_task("anbn").sample(2, 7, torch.Generator())
    with pytest.raises(ValueError, match="no length in 7 fits anbn"):
        check_bins(make_task("anbn"), [(7, 7)])
    too_short = "seq_len = 8 cannot be a training length with these settings (lengths start at 32)"
    with pytest.raises(ValueError, match=re.escape(too_short)):
        make_task("mqar", seq_len=8)
    with pytest.raises(ValueError, match="vocab >= 202"):
        make_task("mqar", n_pairs=100)


def test_task_parameters_are_typed_and_checked() -> None:
    assert make_task("mqar", n_pairs="4", n_queries="2").queries == 2
    with pytest.raises(ValueError, match="mqar has no parameter n_pair; its parameters: seq_len, vocab, n_pairs"):
        make_task("mqar", n_pair=4)
    with pytest.raises(ValueError, match="unknown task 'mqr'; choose one of mqar, in_context_recall"):
        make_task("mqr")


def test_state_report_separates_caches_from_recurrent_state() -> None:
    def tiny(variant: str) -> CausalLM:
        return CausalLM(preset("debug", variant, vocab_size=8, **fields_for(variant, SMALL)))

    attention, recurrent = state_report(tiny("transformer"), 16), state_report(tiny("titans_lmm"), 16)
    assert attention["initial_bytes"] == 0 and attention["after_bytes"] > 0 and attention["grows"]
    assert recurrent["initial_bytes"] == recurrent["after_bytes"] > 0 and not recurrent["grows"]


# ---------------------------------------------------------------------------------------------
# the command


@pytest.mark.parametrize("variant", ["transformer", "hope"])
def test_train_then_eval_end_to_end(variant: str, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NESTLEARN_DEBUG", raising=False)
    out = tmp_path / variant
    common = ["--bins", "8,9-12", "--eval-batches", "1"]
    main(["train", "--task", "compression", "--variant", variant, "--steps", "2", "--seed", "1", "--out", str(out),
          "--batch", "4", "--seq-len", "8", *common])  # fmt: skip
    printed = capsys.readouterr().out
    assert "compression: chance 0.067" in printed and "9-12" in printed
    for name in ("model.safetensors", "model.json", "report.json", "accuracy.png"):
        assert (out / name).is_file(), name
    main(["synth", "eval", "--task", "compression", "--checkpoint", str(out), *common])
    trained, evaluated = (json.loads((out / f).read_text()) for f in ("report.json", "eval.json"))
    assert trained["numbers"]["bins"] == evaluated["numbers"]["bins"]
    assert trained["kind"] == "synth.compression" and trained["seed"] == 1 and trained["commit"]
    assert trained["config"]["variant"] == variant and len(trained["numbers"]["train"]["losses"]) == 2
    assert (out / "eval.png").is_file()


def test_list_names_every_task(capsys) -> None:
    main(["list"])
    printed = capsys.readouterr().out
    assert all(re.search(rf"^{name}\s", printed, re.M) for name in NAMES)


BAD = [
    (["train", "--task", "mqr", "--out", "x"], "unknown task 'mqr'; choose one of mqar, in_context_recall"),
    (["train", "--task", "mqar", "--variant", "hop", "--out", "x"], "unknown variant 'hop'; choose one of hope"),
    (["train", "--task", "mqar", "--out", "x", "--task-arg", "n_pair=3"], "mqar has no parameter n_pair"),
    (["train", "--task", "mqar", "--out", "x", "--task-arg", "n_pairs"], "--task-arg expects KEY=VALUE"),
    (["train", "--task", "mqar", "--out", "x", "--task-arg", "n_pairs=a"], "mqar: n_pairs: expected an integer"),
    (["train", "--task", "mqar", "--out", "x", "--model", "d_modl=32"], "did you mean 'd_model'?"),
    (["train", "--task", "mqar", "--out", "x", "--bins", "9-3"], "--bins expects comma-separated lengths"),
    (["train", "--task", "anbn", "--out", "x", "--bins", "7"], "no length in 7 fits anbn"),
    (["train", "--task", "mqar", "--out", "x", "--size", "huge"], "unknown size 'huge'; choose one of tiny"),
    (["train", "--task", "mqar"], "the following arguments are required: --out"),
    (["frobnicate"], "invalid choice: 'frobnicate' (choose from 'list', 'train', 'eval')"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_input_is_one_line(argv: list[str], message: str, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NESTLEARN_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    err = one_line_error(argv, capsys)
    assert err.startswith("nestlearn synth: ") and message in err, err
    assert not (tmp_path / "x").exists()


def test_eval_of_a_missing_or_other_checkpoint(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NESTLEARN_DEBUG", raising=False)
    err = one_line_error(["eval", "--checkpoint", str(tmp_path / "none")], capsys)
    assert "holds no model.json; give the --out directory of `nestlearn synth train`" in err
    main(["train", "--task", "parity", "--variant", "transformer", "--steps", "1", "--batch", "2", "--seq-len", "4",
          "--eval-batches", "1", "--out", str(tmp_path / "run")])  # fmt: skip
    err = one_line_error(["eval", "--task", "mqar", "--checkpoint", str(tmp_path / "run")], capsys)
    assert "was trained on parity, not mqar; pass --task parity or leave --task out" in err
    err = one_line_error(["eval", "--checkpoint", str(tmp_path / "run"), "--task", "nope"], capsys)
    assert "unknown task 'nope'; choose one of mqar" in err


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `nestlearn synth <argv>` expecting exit status 2 and one line on stderr; returns that line."""
    return nestlearn_error(["synth", *argv], capsys)
