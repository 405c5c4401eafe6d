"""`nestlearn eval lm` and the eval command table: a document read through the state chunk by chunk scores what
one pass scores (float64, every kind of mixer, online CMS included, 1e-9); a full-attention model scores a
document longer than max_seq_len in pieces with the context forgotten between them; a uniform model scores
ln V per token and bits per byte by hand; on a trained run the windows reproduce the trainer's validation loss
and the report holds every split, held-out source and validation source; registered eval modules are
dispatched, missing ones named; bad input is one line."""

from __future__ import annotations

import json
import math
import re
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.eval import command
from nestlearn.eval.command import main
from nestlearn.eval.lm import score_document, score_windows, stream_nats
from nestlearn.models import ModelConfig, next_token_loss
from tests.eval.conftest import copy_run, one_line_error
from tests.models.test_lm import tiny
from tests.train.helpers import records

ONLINE = {"cms_levels": (None, 4), "cms_lr": (0.0, 0.5)}


@pytest.mark.parametrize(
    ("variant", "kw"),
    [("hope", ONLINE), ("hope_attention", ONLINE), ("titans_mac", {}), ("titans_mag", {}), ("transformer", {})],
)
def test_streamed_scoring_equals_one_pass(variant, kw) -> None:
    """Chunks of 7 end inside memory chunks (4), projection chunks (3), CMS segments (4) and MAC segments (8)."""
    model = tiny(variant, **kw)
    ids = torch.randint(1, 64, (1, 30))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        one_pass = next_token_loss(model(inputs)[0], targets, reduction="sum")
    assert abs(float(stream_nats(model, inputs, targets, 7)) - float(one_pass)) < 1e-9


def test_full_attention_scores_long_documents_in_pieces() -> None:
    """max_seq_len 10: a 25-token document is read as [eot] + doc = 26 inputs in pieces of 10, 10, 6, each from a
    fresh context (Transformer++ keeps nothing across forget_context)."""
    model = tiny("transformer", max_seq_len=10)
    doc = torch.randint(1, 64, (25,)).tolist()
    got = score_document(model, ByteTokenizer(), doc, chunk=4)
    ids = torch.tensor([[0, *doc, 0]])
    with torch.no_grad():
        pieces = [next_token_loss(model(ids[:, a:b])[0], ids[:, a + 1 : b + 1], reduction="sum") for a, b in
                  ((0, 10), (10, 20), (20, 26))]  # fmt: skip
    assert got.cut == 1 and got.tokens == 26 and abs(got.nats - float(sum(pieces))) < 1e-9
    hope_attention = tiny("hope_attention", max_seq_len=10, **ONLINE)
    assert score_document(hope_attention, ByteTokenizer(), doc, chunk=4).cut == 1  # reads on, CMS kept


class Uniform(torch.nn.Module):
    """Equal logits for all 256 byte ids: ln 256 nats per token, 8 bits per byte of ASCII text."""

    config = ModelConfig(variant="hope", vocab_size=256)
    device = torch.device("cpu")

    def forward(self, ids: torch.Tensor, state=None, *, learn: bool = True):
        position = 0 if state is None else state.position
        return torch.zeros(*ids.shape, 256, dtype=torch.float64), SimpleNamespace(position=position + ids.shape[1])


def test_metrics_of_a_uniform_model_by_hand() -> None:
    tok, text = ByteTokenizer(), "All the world's a stage, and all the men and women merely players. "
    windows = torch.tensor([tok.encode(text)[i : i + 17] for i in (0, 17, 34)])
    m = score_windows(Uniform(), tok, windows, batch_size=2).metrics()
    assert (m["tokens"], m["bytes"], m["count"]) == (48, 48, 3)
    assert m["loss"] == pytest.approx(math.log(256), abs=1e-12) and m["perplexity"] == pytest.approx(256)
    assert m["bits_per_byte"] == pytest.approx(8.0, abs=1e-12)
    doc = score_document(Uniform(), tok, tok.encode("héllo"), chunk=2).metrics()  # 6 bytes, 6 ids + the end
    assert (doc["tokens"], doc["bytes"]) == (7, 6) and doc["bits_per_byte"] == pytest.approx(8 * 7 / 6, abs=1e-12)
    with_eot = torch.tensor([[104, 105, 0, 104, 105]])  # the separator is predicted but has no bytes
    assert score_windows(Uniform(), tok, with_eot).metrics()["bytes"] == 3


def test_eval_lm_on_a_trained_run(run, tmp_path, capsys) -> None:
    out = tmp_path / "lm.json"
    main(["eval", "lm", str(run), "--windows", "2", "--documents", "3", "--device", "cpu", "--json", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    numbers = report["numbers"]
    assert set(numbers) == {"val", "heldout_essays"} and report["checkpoint"]["step"] == 6
    val = numbers["val"]
    trainer = [r["val_loss"] for r in records(run) if "val_loss" in r][-1]  # the same 2 windows of seq_len 16
    assert val["windows"]["loss"] == pytest.approx(trainer, rel=1e-5) and val["windows"]["tokens"] == 32
    assert val["documents"]["count"] == 3 and set(val["documents"]["by_source"]) == {"plays", "novels"}
    for m in (val["windows"], val["documents"], numbers["heldout_essays"]["documents"]):
        assert m["bits_per_byte"] == pytest.approx(m["nats"] / math.log(2) / m["bytes"])
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert re.search(r"heldout_essays\s+documents\s+1\s", table) and re.search(r"  novels\s+documents", table)
    main(["eval", "lm", str(run), "--windows", "0", "--documents", "3", "--no-learn", "--json", str(out)])
    frozen = json.loads(out.read_text())["numbers"]["val"]
    assert "windows" not in frozen and frozen["documents"]["loss"] != val["documents"]["loss"]  # the CMS learned


def test_registered_eval_modules_are_dispatched(monkeypatch, capsys) -> None:
    fake = types.ModuleType("tests.eval.fake_task")
    fake.register = lambda sub: sub.add_parser("fake").set_defaults(func=lambda args: print("fake ran"))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(command, "EVAL_MODULES", {"fake": fake.__name__, "gone": "nestlearn.eval.no_such_task"})
    main(["eval", "fake"])
    assert capsys.readouterr().out == "fake ran\n"
    err = one_line_error(["eval", "gone", "x"], capsys)
    assert err == "nestlearn eval gone: eval task 'gone' is not available in this installation " \
                  "(nestlearn.eval.no_such_task is missing); available: lm, fake"  # fmt: skip
    real = command.importlib.import_module

    def broken(name: str):
        if name == fake.__name__:
            raise ImportError("cannot import name 'helper' from 'nestlearn.eval.lm'")
        return real(name)

    monkeypatch.setattr(command.importlib, "import_module", broken)
    with pytest.raises(SystemExit):
        main(["eval", "--help"])  # the parser still builds; the broken module is named once, its task is gone
    out, err = capsys.readouterr()
    assert "{lm}" in out and err.count("tests.eval.fake_task could not be imported (cannot import name") == 1
    monkeypatch.setattr(command, "SYNTH_MODULE", "nestlearn.eval.no_such_synth.command")
    err = one_line_error(["synth", "copy"], capsys)
    assert err == "nestlearn synth: synthetic tasks are not available in this installation " \
                  "(nestlearn.eval.no_such_synth.command is missing)"  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "lmm", "{run}"], r"^nestlearn eval: argument task: invalid choice: 'lmm'"),
        (["eval", "lm", "{run}", "--split", "test"], r"has no split 'test'; it has train, val, heldout_essays$"),
        (["eval", "lm", "{run}", "--data", "{tmp}/gone"], r"data directory .*gone \(given\) does not exist; pass"),
        (["eval", "lm", "{tmp}/run", "--windows", "1"], r"data directory .*moved \(recorded in the checkpoint\)"),
        (["eval", "lm", "{run}", "--data", "{tmp}"], r"is not a prepared dataset \(no meta.json\)"),
        (
            ["eval", "lm", "{run}", "--split", "heldout_essays", "--window-len", "1000"],
            r"has 441 tokens, fewer than one window of 1001; pass a shorter --window-len or --windows 0$",
        ),
        (["eval", "lm", "{run}", "--chunk", "9000"], r"--chunk 9000 is longer than this model's max_seq_len \(8192\)"),
    ],
)
def test_bad_eval_input_is_one_line(run, tmp_path, capsys, args, message) -> None:
    moved = copy_run(run, tmp_path)
    meta_path = moved / "checkpoints" / "step_0000006" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["data"] = str(tmp_path / "moved")
    meta_path.write_text(json.dumps(meta))
    err = one_line_error([a.format(run=run, tmp=tmp_path) for a in args], capsys)
    assert re.search(message, err), err
