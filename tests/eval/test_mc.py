"""Zero-shot multiple choice (`nestlearn.eval.mc`) and the lm-eval adapter (`nestlearn.eval.lm_eval_adapter`): a stub
model with known logits gives known log-probabilities, acc, acc_norm, exact and perplexity; reading the context
once and every choice from its state equals scoring context + choice in one pass (float64 tiny models: HOPE with
an online CMS, learning or not; Titans MAC; Transformer++, also cut on the left past max_seq_len; 1e-9), and the
order of the choices changes nothing; LAMBADA items are deterministic per seed, their target is the passage's last
word and their distractors are other words of the passage; task files and BIG-bench JSON are read, bad ones
refused with one line naming the item; `nestlearn eval mc` prints its table and writes the report. With lm-eval
installed (else skipped): the adapter's loglikelihood equals our scorer, rolling log-likelihood equals one pass,
generation equals greedy decoding and stops at a stop string, and lm-eval runs a local YAML task end to end
offline with the accuracies and log-likelihoods of `eval mc`.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nestlearn.data.shards import Shards
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.eval import mc
from nestlearn.eval.command import main
from nestlearn.eval.load import Loaded
from nestlearn.eval.mc import Item
from tests.eval.conftest import one_line_error
from tests.eval.test_longctx import AUSTEN
from tests.models.test_lm import tiny

ONLINE = {"cms_levels": (None, 4), "cms_lr": (0.0, 0.5)}
ALPHABET = " abcdefghijklmnopqrstuvwxyz.,?!:'\n"
ITEMS = [
    {"context": "a cat sat on the", "choices": ["mat", "hat", "ox"], "answer": 0},
    {"context": "one two three", "choices": ["four", "five"], "answer": 1},
    {"context": "a b c ", "choices": ["d", "e f g"], "answer": [0, 1]},
]


class Chars:
    """A tokenizer for the tiny models (vocab 64): the characters of ALPHABET are ids 1.., 0 separates documents."""

    vocab_size, eot, identity = 64, 0, {"name": "chars", "vocab_size": 64}

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) + 1 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(ALPHABET[i - 1] for i in ids if 0 < i <= len(ALPHABET))


class Stub:
    """The same logits `[256]` after every token: zeros, plus `peak` on byte `at` when given."""

    def __init__(self, at: int | None = None, peak: float = 10.0) -> None:
        self.row = torch.zeros(256)
        if at is not None:
            self.row[at] = peak

    def __call__(self, ids: torch.Tensor, state: int | None = None, *, learn: bool = True) -> tuple[torch.Tensor, int]:
        return self.row.expand(1, ids.shape[1], 256), (state or 0) + ids.shape[1]


def one_pass(model, tok, context: str, choice: str, learn: bool) -> float:
    """log p(choice | context) from one forward over [eot] + context + choice (the last token not read)."""
    ctx, cont = mc.encode_pair(tok, context, choice)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx + cont[:-1]]), learn=learn)
    logp = torch.log_softmax(logits[0, len(ctx) - 1 :].double(), dim=-1)
    return float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())


# ---------------------------------------------------------------------------------------------------------
# scoring


def test_stub_with_known_logits_gives_known_scores() -> None:
    """Flat logits: a choice of k characters after " " costs (k + 1) ln 256; the sum prefers the short choice,
    acc_norm (per character) the long one, per token they tie (the first choice wins)."""
    tok, ln = ByteTokenizer(), math.log(256)
    items = [Item("x", ("abcd", "b"), (0,)), Item("y", ("b", "abcd"), (0,))]
    scores = [mc.score_item(Stub(), tok, it) for it in items]
    assert scores[0].logprobs == pytest.approx((-5 * ln, -2 * ln), abs=1e-12)
    assert [(s.pred, s.pred_norm, s.pred_token) for s in scores] == [(1, 0, 0), (0, 1, 0)]
    m = mc.summarize(items, scores)
    assert (m["acc"], m["acc_norm"], m["acc_per_token"], m["exact"], m["chance"]) == (0.5, 0.5, 1.0, 0.0, 0.5)
    assert m["perplexity"] == pytest.approx(256**3.5)
    peaked = Item("x", ("b", "c"), (0,), delimiter="")  # byte "b" carries logit 10 everywhere: greedy
    s = mc.score_item(Stub(at=ord("b")), tok, peaked)
    assert s.greedy == (True, False) and s.logprobs[0] == pytest.approx(10 - math.log(math.exp(10) + 255))
    assert mc.summarize([peaked], [s])["exact"] == 1.0


def test_pairs_split_as_lm_eval_does() -> None:
    tok = ByteTokenizer()
    assert mc.encode_pair(tok, "a b ", "c") == ([0, 97, 32, 98], [32, 99])  # trailing space moves on
    assert mc.encode_pair(tok, "", "hi") == ([0], [104, 105])
    with pytest.raises(ValueError, match="encodes to no token"):
        mc.encode_pair(tok, "a", "")


@pytest.mark.parametrize(("variant", "kw"), [("hope", ONLINE), ("titans_mac", {}), ("transformer", {})])
def test_context_read_once_equals_one_pass(variant: str, kw: dict) -> None:
    """The context (17 tokens with the separator) is read in chunks of 5; no online CMS segment (4) ends inside
    a choice's inputs, so one pass with learning scores what the context state + no-learning choices score."""
    model, tok = tiny(variant, **kw), Chars()
    context, choices = "a cat sat on the", [" mat", " hat", " ox"]
    for learn in (True, False):
        got = mc.score_continuations(model, tok, context, choices, learn=learn, chunk=5)
        want = [one_pass(model, tok, context, c, learn) for c in choices]
        assert got.cut == 0 and got.context_tokens == 17
        assert max(abs(s.logprob - w) for s, w in zip(got.scores, want, strict=True)) < 1e-9
        flipped = mc.score_continuations(model, tok, context, choices[::-1], learn=learn, chunk=5)
        assert [s.logprob for s in flipped.scores[::-1]] == [s.logprob for s in got.scores]
    if variant == "hope":  # the context taught the online level something
        learned, read = (mc.score_continuations(model, tok, context, choices, learn=b).scores for b in (True, False))
        assert abs(learned[0].logprob - read[0].logprob) > 1e-6


def test_full_attention_keeps_the_context_end() -> None:
    """max_seq_len 12, longest choice 4 tokens: 9 context tokens are kept, 8 cut (lm-eval's left truncation)."""
    model, tok = tiny("transformer", max_seq_len=12), Chars()
    got = mc.score_continuations(model, tok, "a cat sat on the", [" mat", " ox"])
    assert (got.context_tokens, got.cut) == (9, 8)
    for choice, s in zip([" mat", " ox"], got.scores, strict=True):
        ctx, cont = mc.encode_pair(tok, "a cat sat on the", choice)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx[-9:] + cont[:-1]]))
        logp = torch.log_softmax(logits[0, 8:].double(), dim=-1)[torch.arange(len(cont)), torch.tensor(cont)]
        assert abs(float(logp.sum()) - s.logprob) < 1e-9


# ---------------------------------------------------------------------------------------------------------
# LAMBADA


def test_lambada_items_are_deterministic_and_end_the_passage() -> None:
    items = mc.lambada_items([AUSTEN], 6, seed=0, context_words=15, distractors=3)
    assert len(items) == 6 and items == mc.lambada_items([AUSTEN], 6, seed=0, context_words=15, distractors=3)
    assert items != mc.lambada_items([AUSTEN], 6, seed=1, context_words=15, distractors=3)
    for it in items:
        target = it.choices[it.answer[0]]
        passage = it.context + it.delimiter + target
        at = AUSTEN.index(passage)
        assert re.match(r"[.!?]", AUSTEN[at + len(passage) :])  # the word closes a sentence
        assert re.findall(r"[^\W\d_]+", passage)[-1] == target and len(re.findall(r"\w+", it.context)) >= 15
        others = [c for i, c in enumerate(it.choices) if i != it.answer[0]]
        assert len(others) == 3 and all(c in re.findall(r"[^\W\d_]+", it.context) for c in others)
        assert target.lower() not in {c.lower() for c in others} and it.delimiter.isspace()


def test_lambada_task_from_a_held_out_split(data: Path) -> None:
    """The held-out essay "How to do great work. " * 20: the target is "work", distractors from How / great."""
    task = mc.lambada_task(Shards(data), None, ByteTokenizer(), 3, 0, context_words=6, distractors=2)
    assert task.source["split"] == "heldout_essays" and len(task.items) == 3
    assert all(it.choices[it.answer[0]] == "work" and set(it.choices) == {"How", "great", "work"} for it in task.items)
    with pytest.raises(ValueError, match="no split 'heldout_x'"):
        mc.lambada_task(Shards(data), "heldout_x", ByteTokenizer(), 3, 0, context_words=6, distractors=2)
    with pytest.raises(ValueError, match="holds no passage of 500\\+ words"):
        mc.lambada_task(Shards(data), None, ByteTokenizer(), 3, 0, context_words=500, distractors=2)


# ---------------------------------------------------------------------------------------------------------
# task files and BIG-bench


def test_task_files_are_read(tmp_path: Path) -> None:
    jsonl, listed = tmp_path / "a.jsonl", tmp_path / "b.json"
    jsonl.write_text("\n".join(json.dumps(i) for i in ITEMS) + "\n\n")
    listed.write_text(json.dumps(ITEMS))
    a, b = mc.load_task_file(jsonl), mc.load_task_file(listed, limit=2)
    assert a.name == "file:a" and len(a.items) == 3 and b.items == a.items[:2]
    assert a.items[2] == Item("a b c ", ("d", "e f g"), (0, 1), " ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": "a",', r"line 2 is not valid JSON"),
        ('[["a"]]', r"item 1 is a list, not an object"),
        ('{"context": "a", "choices": ["b", "c"]}', r"item 1 \(line 1\) has no 'answer'"),
        ('{"context": "a", "choices": ["b"], "answer": 0}', r"choices must be a list of at least 2 non-empty"),
        ('{"context": "a", "choices": ["b", "b"], "answer": 0}', r"choices repeat"),
        ('{"context": "a", "choices": ["b", "c"], "answer": 2}', r"answer must be a choice index 0\.\.1.*got 2"),
        ('{"context": "a", "choices": ["b", "c"], "answer": true}', r"answer must be a choice index"),
        ('{"context": 3, "choices": ["b", "c"], "answer": 0}', r"context and delimiter must be strings"),
        ('{"items": []}', r"item 1 \(line 1\) has no 'context', 'choices', 'answer'"),
        ("\n\n", r"holds no items"),
    ],
)
def test_bad_task_files_are_refused_with_the_item_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        mc.load_task_file(path)


def test_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before any run is loaded."""
    assert "unknown task 'hellaswag'; choose lambada or bigbench:NAME" in one_line_error(
        ["eval", "mc", "no-run", "--tasks", "lambada,hellaswag"], capsys
    )
    missing = one_line_error(["eval", "mc", "no-run", "--task-file", str(tmp_path / "x.jsonl")], capsys)
    assert missing.startswith("nestlearn eval mc: task file") and "does not exist" in missing


BIGBENCH_TASK = {
    "name": "toy",
    "example_output_prefix": "\nA: ",
    "examples": [
        {"input": "2 + 2?", "target_scores": {"4": 1, "5": 0, "22": 0}},
        {"input": "2 + 2?", "target_scores": {"4": 1, "5": 0, "22": 0}},  # a duplicate, dropped
        {"input": "Red or blue?", "target_scores": {"red": 1, "blue": 1, "green": 0}},
    ],
}


def test_bigbench_json_becomes_items() -> None:
    items = mc.bigbench_items(BIGBENCH_TASK, "toy")
    shown = np.random.RandomState(42).permutation(["22", "4", "5"]).tolist()
    assert items[0] == Item("\nQ: 2 + 2?" + "".join(f"\n  choice: {c}" for c in shown) + "\nA: ", ("4", "5", "22"),
                            (0,), "")  # fmt: skip
    assert len(items) == 2 and items[1].answer == (0, 1)
    with pytest.raises(ValueError, match="not a multiple-choice BIG-bench task"):
        mc.bigbench_items({"examples": [{"input": "x", "target": "y"}]}, "gen")


def test_bigbench_tasks_come_from_the_pinned_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in archive with the sdist's layout (its hash pinned for the test): a task is extracted once into
    the cache; an unknown name is refused with the close ones."""
    blob, member = io.BytesIO(), "bigbench-1.0.0/bigbench/benchmark_tasks/toy_task/task.json"
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        data = json.dumps(BIGBENCH_TASK).encode()
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    root = tmp_path / "bigbench-1.0.0"
    root.mkdir()
    (root / "bigbench-1.0.0.tar.gz").write_bytes(blob.getvalue())
    monkeypatch.setenv("NESTLEARN_CACHE", str(tmp_path))
    task = mc.bigbench_task("toy_task")
    assert task.name == "bigbench:toy_task" and len(task.items) == 2
    assert (root / "tasks" / "toy_task" / "task.json").is_file()
    with pytest.raises(ValueError, match=r"no JSON task 'toy_tsk' \(did you mean toy_task\?\)"):
        mc.bigbench_task("toy_tsk")
    with pytest.raises(ValueError, match="is not a task name"):
        mc.bigbench_task("../etc")


def test_command_prints_the_table_and_writes_the_report(
    run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "mine.jsonl"
    items.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    out = tmp_path / "mc.json"
    main(["eval", "mc", str(run), "--tasks", "lambada", "--task-file", str(items), "--data", str(data), "--items", "3",
          "--context-words", "6", "--distractors", "2", "--json", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert re.search(r"^lambada\s+3\s", captured.out, re.M) and re.search(r"^file:mine\s+3\s", captured.out, re.M)
    assert "lambada: 3 items" in captured.err
    report = json.loads(out.read_text())
    assert report["kind"] == "mc" and report["checkpoint"]["step"] == 6 and report["seed"] == 0
    lam = report["numbers"]["lambada"]
    assert lam["source"]["split"] == "heldout_essays" and len(lam["records"]) == 3 and 0 <= lam["acc"] <= 1
    assert report["numbers"]["file:mine"]["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)


# ---------------------------------------------------------------------------------------------------------
# the lm-eval adapter


@pytest.fixture
def adapter():
    pytest.importorskip("lm_eval")
    from nestlearn.eval.lm_eval_adapter import NestLearnLM

    model = tiny("hope", **ONLINE)
    return NestLearnLM(loaded=Loaded(model, Chars(), Path("tiny"), 0, {}))


def requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_adapter_loglikelihood_equals_our_scorer(adapter) -> None:
    from lm_eval.api.registry import get_model

    assert get_model("nestlearn") is type(adapter)
    pairs = [("a cat sat on the", " mat"), ("one two three", " four"), ("a cat sat on the", " ox"), ("", "hi")]
    got = adapter.loglikelihood(requests("loglikelihood", pairs))
    for (context, cont), (ll, greedy) in zip(pairs, got, strict=True):
        ours = mc.score_continuations(adapter.model, adapter.tok, context, [cont]).scores[0]
        assert (ll, greedy) == (ours.logprob, ours.greedy)
    task = mc.evaluate_task(adapter.model, adapter.tok, mc.Task("t", tuple(mc.check_item(i, "i") for i in ITEMS)))
    flat = [(i["context"], " " + c) for i in ITEMS for c in i["choices"]]
    assert [ll for ll, _ in adapter.loglikelihood(requests("loglikelihood", flat))] == [
        x for r in task["records"] for x in r["logprobs"]
    ]


def test_adapter_rolling_and_generation(adapter) -> None:
    model, tok = adapter.model, adapter.tok
    text = "the cat sat on the mat, and the dog sat on the log."
    ids = torch.tensor([[tok.eot, *tok.encode(text)]])
    with torch.no_grad():
        one = torch.log_softmax(model(ids[:, :-1])[0][0].double(), dim=-1)[torch.arange(len(text)), ids[0, 1:]]
    rolled = adapter.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), ("",)]))
    assert abs(rolled[0] - float(one.sum())) < 1e-9 and rolled[1] == 0.0
    seq = [tok.eot, *tok.encode("the cat")]
    for _ in range(6):  # greedy, one pass each time (the online CMS learns the same way token by token)
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        if seq[-1] == tok.eot:  # generation ends at the separator
            break
    greedy = tok.decode(seq[len(tok.encode("the cat")) + 1 :])
    gen = adapter.generate_until(requests("generate_until", [("the cat", {"until": [], "max_gen_toks": 6})]))
    assert gen == [greedy]
    stop = greedy[2:4] if greedy[2:4] else "\n"
    cut = adapter.generate_until(requests("generate_until", [("the cat", {"until": [stop], "max_gen_toks": 6})]))
    assert cut == [greedy[: greedy.index(stop)] if stop in greedy else greedy]


def test_lm_eval_runs_a_local_yaml_task_offline(adapter, tmp_path: Path) -> None:
    from nestlearn.eval.lm_eval_adapter import evaluate

    single = [*ITEMS[:2], {**ITEMS[2], "answer": 1}]  # lm-eval wants one kind of answer per dataset column
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in single))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: nestlearn_tiny_mc\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {tmp_path / 'items.jsonl'}\n  cache_dir: {tmp_path / 'hf'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    res = evaluate(adapter, ["nestlearn_tiny_mc"], include_path=tmp_path, include_defaults=False, bootstrap_iters=0,
                   log_samples=True)  # fmt: skip
    assert res is not None
    ours = mc.evaluate_task(adapter.model, adapter.tok, mc.load_task_file(tmp_path / "items.jsonl"))
    got = res["results"]["nestlearn_tiny_mc"]
    assert (got["acc,none"], got["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    samples = sorted(res["samples"]["nestlearn_tiny_mc"], key=lambda s: s["doc_id"])
    assert [[r[0][0] for r in s["resps"]] for s in samples] == [r["logprobs"] for r in ours["records"]]
