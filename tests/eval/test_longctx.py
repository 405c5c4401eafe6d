"""Long-context recall (`nestlearn.eval.niah`, `babilong`, `longctx`): samples are deterministic per seed and have
the requested length; the needle sits at the requested depth and the bAbI facts at theirs, in story order; every
bAbI answer is right by construction (a hand-checked story per task, and 150 stories per task solved again from
their fact sentences by an independent reader); an oracle that knows the answers scores 100 % both ways and a
uniform model scores exactly chance on the likelihood rank; scoring a context streamed in chunks equals reading
context + question + answer in one pass (tiny HOPE with online CMS, float64, 1e-9); a full-attention model is
refused a context beyond its max_seq_len with one clear line (a grid skips those lengths and says why); the
commands `nestlearn eval niah` / `babilong` print a table, progress on stderr, and write the report and heatmap.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.eval import babilong as bl
from nestlearn.eval import longctx as lc
from nestlearn.eval import niah
from nestlearn.eval.command import main
from nestlearn.models import CausalLM, ModelConfig
from tests.eval.conftest import one_line_error

TOK = ByteTokenizer()
# Public domain (Jane Austen, Pride and Prejudice, 1813): a small book haystack.
AUSTEN = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    'the rightful property of some one or other of their daughters. "My dear Mr. Bennet," said his lady to him '
    'one day, "have you heard that Netherfield Park is let at last?" Mr. Bennet replied that he had not. "But it '
    'is," returned she; "for Mrs. Long has just been here, and she told me all about it." Mr. Bennet made no '
    'answer. "Do you not want to know who has taken it?" cried his wife impatiently. "You want to tell me, and I '
    'have no objection to hearing it." This was invitation enough.'
)
TINY = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, mlp_hidden=48)


class Uniform:
    """Flat logits everywhere: knows nothing. The state counts tokens."""

    def __call__(self, ids: torch.Tensor, state: int | None = None) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, ids.shape[1], 256), (state or 0) + ids.shape[1]


class Oracle:
    """Knows the sample: after context + a query's prompt it puts its mass on the next token of the reference
    answer (logit 20) and of each single true value (logit 10); flat elsewhere. The state is the tokens read."""

    def __init__(self, sample: niah.Sample) -> None:
        self.start = len(sample.context)
        self.paths = []
        for q in sample.queries:
            base = sample.context + q.prompt
            self.paths.append((base + TOK.encode(q.target), 20.0))
            self.paths += [(base + TOK.encode(" " + a), 10.0) for a in q.answers]

    def __call__(self, ids: torch.Tensor, state: tuple[int, ...] | None = None) -> tuple[torch.Tensor, tuple]:
        seen, rows = state or (), []
        for t in ids[0].tolist():
            seen, row = (*seen, t), torch.zeros(256)
            for path, weight in self.paths if len(seen) >= self.start else ():
                if len(seen) < len(path) and tuple(path[: len(seen)]) == seen:
                    row[path[len(seen)]] = max(float(row[path[len(seen)]]), weight)
            rows.append(row)
        return torch.stack(rows)[None], seen


# ---------------------------------------------------------------------------------------------------------
# samples


def test_samples_are_deterministic_per_seed_and_have_the_requested_length() -> None:
    book = niah.Book(AUSTEN)
    for task in niah.TASKS:
        a, b = (niah.niah_sample(task, TOK, 1024, 0.3, book, seed=5) for _ in range(2))
        c = niah.niah_sample(task, TOK, 1024, 0.3, book, seed=6)
        assert a == b and a.context != c.context and a.length == len(a.context) + _answer_room(a) == 1024
        elsewhere = niah.niah_sample(task, TOK, 2048, 0.8, book, seed=5)  # the same needles in every cell
        assert elsewhere.pieces == a.pieces and elsewhere.context != a.context
    for task in bl.TASKS:
        a, b = (bl.babilong_sample(task, TOK, 1024, book, seed=5) for _ in range(2))
        c = bl.babilong_sample(task, TOK, 1024, book, seed=6)
        assert a == b and a.context != c.context and a.length == 1024
        short = bl.babilong_sample(task, TOK, 2048, book, seed=5)  # the same story at every length
        assert short.meta["story"] == a.meta["story"] and short.length == 2048
    with pytest.raises(niah.TooShort, match="too short"):
        niah.niah_sample("multikey", TOK, 300, 0.5, book)


def _answer_room(sample: niah.Sample) -> int:
    return max(len(q.prompt) + q.budget for q in sample.queries)


@pytest.mark.parametrize("haystack", [niah.Noise(), niah.Book(AUSTEN)], ids=["noise", "book"])
@pytest.mark.parametrize("task", ["passkey", "single"])
def test_the_needle_sits_at_the_requested_depth(task: str, haystack: niah.Haystack) -> None:
    lines = niah.NOISE if isinstance(haystack, niah.Noise) else haystack.lines
    longest = max(len(TOK.encode(" " + s)) for s in lines)
    for depth in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        sample = niah.niah_sample(task, TOK, 2048, depth, haystack, seed=1)
        needle = TOK.encode(" " + sample.pieces[0])
        start = _find(sample.context, needle)
        assert (start, start + len(needle)) == sample.spans[0]
        before = start - len(TOK.encode(sample.meta["header"]))  # haystack tokens before the needle
        assert abs(before - depth * sample.haystack_tokens) <= longest / 2, (depth, before)
        assert str(sample.queries[0].answers[0]) in sample.pieces[0]


def test_babilong_facts_appear_in_story_order_at_their_depths() -> None:
    book = niah.Book(AUSTEN)
    for task in bl.TASKS:
        sample = bl.babilong_sample(task, TOK, 4096, book, seed=3)
        story, starts = sample.meta["story"], []
        head = len(TOK.encode(sample.meta["header"]))
        for i, (fact, depth) in enumerate(zip(story["facts"], sample.meta["depths"], strict=True)):
            ids = TOK.encode(" " + fact)
            start = _find(sample.context, ids, after=starts[-1] + 1 if starts else 0)
            assert (start, start + len(ids)) == sample.spans[i]
            facts_before = sum(b - a for a, b in sample.spans[:i])
            assert abs(start - head - facts_before - depth * sample.haystack_tokens) <= 300  # one Austen sentence
            starts.append(start)
        assert starts == sorted(starts) and sample.queries[0].text == f"Question: {story['question']}\nAnswer:"
        bare = bl.babilong_sample(task, TOK, 0, book, seed=3)  # length 0: the facts alone
        text = TOK.decode(bare.context)
        assert text == sample.meta["header"] + "".join(" " + f for f in story["facts"]) and bare.haystack_tokens == 0


def _find(seq: list[int], sub: list[int], after: int = 0) -> int:
    for i in range(after, len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    raise AssertionError("not found")


# ---------------------------------------------------------------------------------------------------------
# bAbI by construction

HAND_CHECKED = {  # (task, seed, facts) -> story; each answer worked out by hand from the facts
    ("qa1", 7, 4): (["Sandra moved to the hallway.", "Mary went back to the bathroom.", "Mary went back to the office.",
                     "Mary journeyed to the kitchen."], "Where is Mary?", "kitchen"),
    ("qa2", 7, 6): (["John went to the office.", "Mary went back to the garden.", "John went to the bathroom.",
                     "Mary picked up the milk.", "Mary moved to the kitchen.", "Mary went back to the hallway."],
                    "Where is the milk?", "hallway"),
    ("qa3", 7, 8): (["John went to the office.", "Mary went back to the garden.", "John went to the bathroom.",
                     "Mary picked up the milk.", "Mary moved to the kitchen.", "Mary went back to the hallway.",
                     "Daniel journeyed to the bathroom.", "John moved to the office."],
                    "Where was the milk before the hallway?", "kitchen"),
    ("qa4", 2, 2): (["The bathroom is west of the kitchen.", "The kitchen is west of the bedroom."],
                    "What is east of the kitchen?", "bedroom"),  # the inverse of the second fact
    ("qa4", 7, 2): (["The hallway is north of the garden.", "The office is east of the hallway."],
                    "What is north of the garden?", "hallway"),
    ("qa5", 7, 6): (["Mary travelled to the hallway.", "John went to the hallway.", "Daniel journeyed to the hallway.",
                     "Mary grabbed the apple.", "Mary handed the apple to John.", "John gave the apple to Mary."],
                    "What did Mary give to John?", "apple"),
}  # fmt: skip


@pytest.mark.parametrize("key", list(HAND_CHECKED), ids=lambda k: f"{k[0]}-seed{k[1]}")
def test_a_hand_checked_story_per_task(key: tuple[str, int, int]) -> None:
    task, seed, n = key
    story = bl.make_story(task, random.Random(seed), n)
    assert (list(story.facts), story.question, story.answer) == HAND_CHECKED[key]
    assert _solve(story.facts, story.question) == {story.answer}


@pytest.mark.parametrize("task", bl.TASKS)
def test_every_answer_follows_from_the_facts(task: str) -> None:
    rng = random.Random(task)
    for i in range(150):
        story = bl.make_story(task, rng, None if i % 2 else rng.randint(bl.MIN_FACTS[task], 14))
        assert _solve(story.facts, story.question) == {story.answer}, story
        assert story.answer in story.candidates and len(set(story.candidates)) == len(story.candidates) >= 4


MOVE = re.compile(r"(\w+) (?:went to|journeyed to|travelled to|moved to|went back to) the (\w+)\.")
PICK = re.compile(r"(\w+) (?:picked up|got|grabbed|took) the (\w+)\.")
DROP = re.compile(r"(\w+) (?:dropped|put down|discarded|left) the (\w+)\.")
GIVE = re.compile(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.")
NEXT_TO = re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")
INVERSE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def _solve(facts: tuple[str, ...] | list[str], question: str) -> set[str]:
    """Every answer the facts allow (a well-posed question has one), read from the sentences alone; also checks
    that the world they describe is consistent (a pick-up where the object is, transfers between people who
    hold the object and stand in one place)."""
    person, carrier, place, trail, gives, rel = {}, {}, {}, {}, [], set()
    for fact in facts:
        if m := MOVE.fullmatch(fact):
            person[m[1]] = m[2]
            for obj in [o for o, c in carrier.items() if c == m[1]]:
                place[obj] = m[2]
                trail[obj] += [m[2]] if trail[obj][-1] != m[2] else []
        elif m := PICK.fullmatch(fact):
            assert m[2] not in carrier and place.get(m[2], person[m[1]]) == person[m[1]], fact
            carrier[m[2]], place[m[2]] = m[1], person[m[1]]
            trail.setdefault(m[2], [])
            trail[m[2]] += [person[m[1]]] if trail[m[2]][-1:] != [person[m[1]]] else []
        elif m := DROP.fullmatch(fact):
            assert carrier.pop(m[2]) == m[1], fact
        elif m := GIVE.fullmatch(fact):
            assert carrier[m[2]] == m[1] and person[m[1]] == person[m[3]] and m[1] != m[3], fact
            carrier[m[2]] = m[3]
            gives.append((m[1], m[2], m[3]))
        elif m := NEXT_TO.fullmatch(fact):
            rel |= {(m[1], m[2], m[3]), (m[3], INVERSE[m[2]], m[1])}
        else:
            raise AssertionError(f"unreadable fact {fact!r}")
    return _answer(question, person, place, trail, gives, rel)


def _answer(q: str, person: dict, place: dict, trail: dict, gives: list, rel: set) -> set[str]:
    if m := re.fullmatch(r"Where is the (\w+)\?", q):
        return {place[m[1]]}
    if m := re.fullmatch(r"Where is (\w+)\?", q):
        return {person[m[1]]}
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", q):
        t = trail[m[1]]
        return {t[i - 1] for i in range(1, len(t)) if t[i] == m[2]}
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", q):
        return {a for a, d, b in rel if (d, b) == (m[1], m[2])}
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", q):
        return {b for a, d, b in rel if (a, d) == (m[1], m[2])}
    forms = [(r"Who gave the (\w+) to (\w+)\?", (1, 2), 0), (r"Who gave the (\w+)\?", (1,), 0),
             (r"Who did (\w+) give the (\w+) to\?", (0, 1), 2), (r"Who received the (\w+)\?", (1,), 2),
             (r"What did (\w+) give to (\w+)\?", (0, 2), 1)]  # fmt: skip
    for pattern, slots, asked in forms:
        if m := re.fullmatch(pattern, q):
            return {g[asked] for g in gives if all(g[s] == m[k + 1] for k, s in enumerate(slots))}
    raise AssertionError(f"unreadable question {q!r}")


# ---------------------------------------------------------------------------------------------------------
# scoring


def test_an_oracle_scores_everything_and_a_uniform_model_scores_chance() -> None:
    book = niah.Book(AUSTEN)
    samples = [niah.niah_sample(t, TOK, 1024, 0.5, book, seed=2) for t in niah.TASKS]
    samples += [bl.babilong_sample(t, TOK, 1024, book, seed=2) for t in bl.TASKS]
    for sample in samples:
        oracle = lc.score_sample(Oracle(sample), TOK, sample, chunk=300)
        uniform = lc.score_sample(Uniform(), TOK, sample, chunk=300)
        for good, flat, q in zip(oracle, uniform, sample.queries, strict=True):
            n = 1 + len(q.distractors)
            assert all(good.found) and set(good.top1) == {1.0} and set(good.rank) == {1.0}, sample.meta["task"]
            assert not any(flat.found)
            assert all(t == pytest.approx(1 / n, abs=1e-12) for t in flat.top1)
            assert all(r == pytest.approx((n + 1) / 2, abs=1e-12) for r in flat.rank)


def test_grids_report_chance_for_a_uniform_model() -> None:
    res = lc.run_niah(Uniform(), TOK, tasks=["multivalue"], lengths=[800], depths=[0.0, 1.0], samples=2)
    cells = res["tasks"]["multivalue"]["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == [(800, 0.0), (800, 1.0)]
    assert all(c["rank_top1"] == pytest.approx(0.1) == c["chance_top1"] and c["exact"] == 0 for c in cells)
    assert len(cells[0]["records"]) == 2 and cells[0]["records"][0]["answers"]
    res = lc.run_babilong(Uniform(), TOK, tasks=["qa1", "qa5"], lengths=[0, 700], samples=3)
    qa1 = res["tasks"]["qa1"]
    assert qa1["rank_top1"] == pytest.approx(1 / 6) and [c["length"] for c in qa1["cells"]] == [0, 700]


def test_streamed_scoring_equals_one_pass_for_a_recurrent_model() -> None:
    cfg = ModelConfig(variant="hope", mem_chunk=8, proj_chunk=8, cms_levels=(None, 16), cms_lr=0.05, **TINY)
    model = CausalLM(cfg).double().eval()
    sample = niah.niah_sample("passkey", TOK, 330, 0.4, niah.Noise(), seed=0, candidates=4)
    whole = lc.score_sample(model, TOK, sample, chunk=10_000)[0]
    streamed = lc.score_sample(model, TOK, sample, chunk=23)[0]
    q = sample.queries[0]
    rows = [sample.context + q.prompt + TOK.encode(" " + value) for value in (*q.answers, *q.distractors)]
    m = len(TOK.encode(" " + q.answers[0]))
    assert {len(ids) for ids in rows} == {len(rows[0])}  # passkeys of one length: one batch, a row each
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1] for ids in rows]))  # context + question + answer in one pass
    for score, ids, row_logits in zip(whole.scores[0], rows, logits, strict=True):
        logp = torch.log_softmax(row_logits[-m:], dim=-1)[torch.arange(m), torch.tensor(ids[-m:])]
        assert score == pytest.approx(float(logp.mean()), abs=1e-9, rel=0)
    assert streamed.generated == whole.generated
    for a, b in zip(streamed.scores[0], whole.scores[0], strict=True):
        assert a == pytest.approx(b, abs=1e-9, rel=0)


def test_a_full_attention_model_is_refused_a_context_beyond_max_seq_len() -> None:
    model = CausalLM(ModelConfig(variant="transformer", max_seq_len=600, **TINY)).eval()
    sample = niah.niah_sample("passkey", TOK, 1024, 0.5, niah.Noise())
    with pytest.raises(ValueError, match=r"reads at most max_seq_len = 600 tokens, but this sample needs 1,024"):
        lc.score_sample(model, TOK, sample)
    res = lc.run_niah(model, TOK, tasks=["passkey"], lengths=[512, 1024], depths=[0.5], samples=1)
    scored, skipped = res["tasks"]["passkey"]["cells"]
    assert "exact" in scored and "max_seq_len = 600" in skipped["skipped"] and "1024" in res["skipped_lengths"]
    with pytest.raises(ValueError, match="max_seq_len = 600") as info:
        lc.run_babilong(model, TOK, tasks=["qa1"], lengths=[1024, 2048])
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# the commands


def test_the_niah_and_babilong_commands(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "niah.json"
    main(["eval", "niah", str(run), "--tasks", "passkey,multiquery", "--lengths", "768", "--depths", "0,100",
          "--samples", "1", "--device", "cpu", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr()
    header = r"passkey: greedy exact / likelihood top-1 \(chance 0\.10\)\n +length +depth 0% +depth 100%\n +768 "
    assert re.search(header, printed.out)
    assert "niah multiquery length 768 depth 100% sample 1/1: exact" in printed.err
    report = json.loads(out.read_text())
    cells = report["numbers"]["tasks"]["multiquery"]["cells"]
    assert report["kind"] == "niah" and report["seed"] == 0 and report["config"]["depths"] == [0.0, 1.0]
    assert len(cells) == 2 and len(cells[0]["records"]) == 4 and 0 <= cells[0]["rank_top1"] <= 1
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    book = tmp_path / "austen.txt"
    book.write_text(AUSTEN)
    png = tmp_path / "bl.png"
    main(["eval", "babilong", str(run), "--tasks", "qa1,qa4", "--lengths", "0,1K", "--samples", "1",
          "--haystack", f"file:{book}", "--device", "cpu", "--png", str(png)])  # fmt: skip
    printed = capsys.readouterr()
    assert re.search(r"task +chance +0 +1K\n +qa1 +0\.17 +\d\.\d\d / \d\.\d\d +\d\.\d\d / ", printed.out)
    assert "babilong qa4 length 1K sample 1/1: exact" in printed.err
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_command_mistakes_are_one_line(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(["eval", "niah", str(run), "--lengths", "16K", "--device", "cpu"], capsys)
    assert err.startswith("nestlearn eval niah: hope_attention attends over its whole context") and "8,192" in err
    err = one_line_error(["eval", "babilong", str(run), "--haystack", "nowhere"], capsys)
    assert "unknown haystack 'nowhere'" in err
    err = one_line_error(["eval", "niah", str(run), "--tasks", "single,needle"], capsys)
    assert "unknown NIAH task needle" in err
    err = one_line_error(["eval", "niah", str(run), "--depths", "0,150"], capsys)
    assert "percentages in 0..100" in err
    assert lc.parse_lengths("0, 1K,128k,1000") == [0, 1024, 131072, 1000]
