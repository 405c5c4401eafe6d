"""`make demo` keeps its time budget, draws every curve with markers, and prints the fact test for both models:
end to end on a tiny corpus (no network) with a budget of half a minute, and its parts on their own."""

from __future__ import annotations

import time

import pytest

from nestlearn import demo
from nestlearn.data import shards as shards_mod

MINUTES = 0.5  # the whole demo's budget in the end-to-end test
SLACK_S = 15.0  # allowed overshoot: the HOPE step that crosses its deadline and the evaluation after it on a busy
# CPU (measured on the shared 2-core machine: the whole test took 25 to 35 s)
LINES = ["To be, or not to be, that is the question: ", "Whether 'tis nobler in the mind to suffer ",
         "The slings and arrows of outrageous fortune, ", "Or to take arms against a sea of troubles. "]  # fmt: skip
CORPUS = {"shakespeare": {f"play{i}": "".join(LINES[(i + k) % 4] for k in range(60)) for i in range(4)}}


@pytest.fixture
def tiny_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards_mod, "read_docs", lambda name: CORPUS[name])
    monkeypatch.setattr(shards_mod, "licence", lambda name: "public domain")


def test_the_demo_keeps_its_budget_and_shows_everything(tmp_path, tiny_corpus, capsys) -> None:
    pytest.importorskip("matplotlib")
    threads, t0 = demo.torch.get_num_threads(), time.perf_counter()
    report = demo.main(["--minutes", str(MINUTES), "--out", str(tmp_path)])
    took = time.perf_counter() - t0
    assert demo.torch.get_num_threads() == threads  # the demo's choice does not outlive it
    printed = capsys.readouterr().out
    assert took <= 60 * MINUTES + SLACK_S, f"the demo took {took:.1f} s of a {60 * MINUTES:.0f} s budget"
    assert f"time budget: {MINUTES:g} min" in printed and "time taken: " in printed and "threads: " in printed
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert len(report["curves"]["transformer training"]["x"]) >= 2  # HOPE may take one step in its few seconds
    for variant in demo.MODELS:
        train, val = report["curves"][f"{variant} training"], report["curves"][f"{variant} validation"]
        assert len(train["x"]) >= 1 and len(val["x"]) >= 1, (variant, train, val)
        assert train["marker"] == "o" and val["marker"] == "s"  # so that a curve of one point still shows
        assert all(x > 0 for x in train["x"])  # training bytes, not steps from 0
        assert f"\n  {variant:12s} " in printed.split("what remains of a document")[1]  # its row of the fact test
    fact = report["results"]["transformer"]["fact"]
    assert fact["before"] == fact["after"]  # nothing of a forgotten context remains in a Transformer


def test_a_curve_of_one_point_is_drawn_with_a_marker(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    log = [{"step": 1, "tokens": 512, "loss": 5.0, "val_loss": 5.1}]
    curves = demo.plot({"hope": {"log": log}, "transformer": {"log": [*log, {"step": 2, "tokens": 1024, "loss": 4}]}},
                       tmp_path / "loss.png")  # fmt: skip
    assert (tmp_path / "loss.png").is_file()
    assert curves["hope training"]["x"] == [512] and curves["hope training"]["marker"] == "o"
    assert curves["transformer training"]["y"] == [5.0, 4] and curves["hope validation"]["y"] == [5.1]


@pytest.mark.parametrize(("load", "cores", "want"), [(0.1, 2, 2), (0.9, 2, 1), (1.7, 2, 1), (3.0, 2, 1)])
def test_threads_follow_the_load(load, cores, want, monkeypatch) -> None:
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 2)
    threads, why = demo.choose_threads(load=load, cores=cores)
    assert threads == want and f"{load:.2f}" in why


def test_the_fact_test_cannot_move_a_transformer() -> None:
    model = demo.CausalLM(demo.preset("debug", "transformer", vocab_size=256, n_layers=1, d_model=32, n_heads=2))
    out = demo.fact_recall(model, demo.Fact(reads=1))
    assert out["before"] == out["after"] and out["before"][0] != out["before"][1]


def test_minutes_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        demo.main(["--minutes", "0"])
