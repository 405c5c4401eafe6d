"""`nestlearn eval continual` (`nestlearn.eval.continual`): the continual-learning metrics, the protocol loop and
the two protocols, the model as a learner in train and context mode, and the command.

- Metrics on hand-made matrices: average accuracy, BWT and forgetting (per task too) computed by hand, for an
  accuracy and for a loss (lower is better: positive BWT = improvement); one task gives NaN; a non-square matrix
  is refused.
- Bookkeeping: R is `[T, T]`, and row i is measured right after task i is learned (the event log
  learn 0, measure (0, 0..T-1), learn 1, ...).
- Stubs: an oracle classifier (the true label every time) scores 100 % everywhere with BWT = forgetting = 0; a
  classifier that remembers only the last task's classes gives the identity matrix, BWT = -1, forgetting = 1;
  the LM-stream analogues give the expected loss metrics.
- The model learner: context mode leaves every outer parameter bitwise equal while the online CMS state
  changes (and its loss matrix moves); a model that keeps nothing between contexts (static levels) has equal rows
  and BWT = forgetting = 0 exactly; train mode changes the weights of its own copy only; label scores (prompt and
  label read in two calls from the learned state repeated over the batch) equal the log-likelihood of one pass of
  each row; the static variant has the same weights and no online level.
- End to end: tiny runs of both protocols in both modes, and a trained run on a prepared dataset (its sources as
  classes and domains), each a few seconds: table, JSON report, PNG.
- Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.eval.command import main
from nestlearn.eval.continual import (
    ClassTask,
    Domain,
    ModelLearner,
    Settings,
    build_variants,
    class_incremental,
    class_tasks,
    continual_metrics,
    domain_incremental,
    domains,
    make_learner,
    repeat_state,
    run_matrix,
    synthetic_sources,
    tiny_model,
)
from nestlearn.eval.synth.run import SMALL
from nestlearn.models import CausalLM, next_token_loss, preset
from nestlearn.models.config import fields_for
from tests.eval.conftest import one_line_error

TOK = ByteTokenizer()


def small_tasks(per_task: int = 1, n: int = 3, examples: int = 3, tests: int = 2, length: int = 8) -> list[ClassTask]:
    return class_tasks(synthetic_sources(TOK, n, chars=400), per_task, examples, tests, length)


def small_stream(n: int = 3, learn_tokens: int = 48, windows: int = 2, length: int = 16) -> list[Domain]:
    return domains(synthetic_sources(TOK, n, chars=400), learn_tokens, windows, length)


def online_hope(lr: float = 0.5) -> CausalLM:
    """A tiny HOPE whose online level learns every 8 tokens at a rate that visibly moves it."""
    torch.manual_seed(0)
    fields = {**fields_for("hope", SMALL), "cms_levels": (None, 8), "cms_lr": (0.0, lr)}
    return CausalLM(preset("debug", "hope", **fields, vocab_size=256)).eval()


# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_on_hand_made_matrices() -> None:
    R = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.5, 0.7, 0.9]]
    m = continual_metrics(R)
    assert m["average"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)  # -0.25
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)  # 0.25
    assert m["forgetting_per_task"] == pytest.approx([0.4, 0.1])
    better = continual_metrics([[0.5, 0.0], [0.8, 0.9]])  # learning task 1 helped task 0
    assert better["bwt"] == pytest.approx(0.3) and better["forgetting"] == pytest.approx(-0.3)
    loss = continual_metrics([[2.0, 5.0], [3.0, 2.5]], lower_is_better=True)  # task 0's loss rose by 1
    assert loss["average"] == pytest.approx(2.75)
    assert loss["bwt"] == pytest.approx(-1.0) and loss["forgetting"] == pytest.approx(1.0)
    gain = continual_metrics([[2.0, 5.0, 5.0], [1.5, 2.5, 4.0], [1.8, 2.0, 2.2]], lower_is_better=True)
    assert gain["bwt"] == pytest.approx(((2.0 - 1.8) + (2.5 - 2.0)) / 2)  # positive: the losses fell
    assert gain["forgetting"] == pytest.approx(((1.8 - 1.5) + (2.0 - 2.5)) / 2)  # min over rows 0..T-2
    one = continual_metrics([[0.7]])
    assert one["average"] == 0.7 and math.isnan(one["bwt"]) and math.isnan(one["forgetting"])
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[0.1, 0.2]])


def test_matrix_rows_are_measured_right_after_each_task() -> None:
    log: list[tuple] = []

    def learn(i: int) -> None:
        log.append(("learn", i))

    def measure(i: int, j: int) -> float:
        log.append(("measure", i, j))
        return 10.0 * sum(e[0] == "learn" for e in log) + j  # tasks learned so far, then the column

    R = run_matrix(3, learn, measure)
    assert R.shape == (3, 3)
    assert R.tolist() == [[10 * (i + 1) + j for j in range(3)] for i in range(3)]
    expected = [e for i in range(3) for e in [("learn", i), *(("measure", i, j) for j in range(3))]]
    assert log == expected  # the diagonal R[i, i] right after task i, before task i + 1


# ---------------------------------------------------------------------------------------------
# stubs through the protocols


class Oracle:
    """Knows every text's label; remembers the label set of the last task it learned when `forget` is set."""

    def __init__(self, tasks: list[ClassTask], forget: bool = False) -> None:
        self.truth = {x.tobytes(): y for t in tasks for x, y in (*t.learn, *t.test)}
        self.forget = forget
        self.known: set[str] = set()

    def learn(self, examples) -> None:
        self.known = {y for _, y in examples} if self.forget else self.known | {y for _, y in examples}

    def predict(self, texts: np.ndarray, candidates) -> list[str]:
        out = []
        for x in texts:
            y = self.truth[x.tobytes()]
            out.append(y if not self.forget or y in self.known else next(c for c in candidates if c != y))
        return out


class LastDomain:
    """Loss 1 on the domain learned last, 3 elsewhere (or 1 everywhere when it forgets nothing)."""

    def __init__(self, stream: list[Domain], forget: bool = True) -> None:
        self.names = {d.test.tobytes(): d.name for d in stream}
        self.by_learn = {d.learn.tobytes(): d.name for d in stream}
        self.forget, self.last = forget, None

    def learn_stream(self, tokens: np.ndarray) -> None:
        self.last = self.by_learn[tokens.tobytes()]

    def loss(self, windows: np.ndarray) -> float:
        return 1.0 if not self.forget or self.names[windows.tobytes()] == self.last else 3.0


def test_oracle_scores_everything_and_forgets_nothing() -> None:
    tasks = small_tasks(per_task=2, n=6)
    R = class_incremental(Oracle(tasks), tasks)
    assert R.shape == (3, 3) and (R == 1.0).all()
    m = continual_metrics(R)
    assert (m["average"], m["bwt"], m["forgetting"]) == (1.0, 0.0, 0.0)
    stream = small_stream()
    L = domain_incremental(LastDomain(stream, forget=False), stream)
    m = continual_metrics(L, lower_is_better=True)
    assert (m["average"], m["bwt"], m["forgetting"]) == (1.0, 0.0, 0.0)


def test_forgetting_all_but_the_last_task() -> None:
    tasks = small_tasks(per_task=1, n=4)
    R = class_incremental(Oracle(tasks, forget=True), tasks)
    assert np.array_equal(R, np.eye(4))
    m = continual_metrics(R)
    assert m["average"] == pytest.approx(1 / 4) and m["bwt"] == -1.0 and m["forgetting"] == 1.0
    stream = small_stream(n=4)
    L = domain_incremental(LastDomain(stream), stream)
    assert np.array_equal(L, np.where(np.eye(4) == 1, 1.0, 3.0))
    m = continual_metrics(L, lower_is_better=True)
    assert m["average"] == pytest.approx((3 * 3 + 1) / 4) and m["bwt"] == -2.0 and m["forgetting"] == 2.0


def test_candidates_grow_with_the_tasks_seen() -> None:
    tasks = small_tasks(per_task=2, n=6)
    seen: list[list[str]] = []

    class Recorder(Oracle):
        def predict(self, texts, candidates):
            seen.append(list(candidates))
            return super().predict(texts, candidates)

    class_incremental(Recorder(tasks), tasks)
    assert seen[0] == ["s0", "s1"] and seen[1] == ["s0", "s1", "s2", "s3"]  # after task 0: on tasks 0 and 1
    assert all(len(c) == 6 for c in seen[-3:])
    seen.clear()
    class_incremental(Recorder(tasks), tasks, candidates="all")
    assert all(len(c) == 6 for c in seen)


# ---------------------------------------------------------------------------------------------
# the model as a learner


def test_context_mode_changes_no_outer_weight_but_the_cms_state() -> None:
    model = online_hope()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = ModelLearner(model, TOK, Settings(mode="context", chunk=24, batch_size=4))
    stream = small_stream(n=2)
    L = domain_incremental(learner, stream)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bitwise equal
    assert all(p.grad is None for p in model.parameters())
    cms = next(b.cms for b in learner.state.blocks if b.cms is not None and any(lv is not None for lv in b.cms.levels))
    init = next(b.cms for b in model.init_state(1).blocks if any(lv is not None for lv in b.cms.levels))
    level = next(i for i, lv in enumerate(cms.levels) if lv is not None)
    assert not torch.equal(cms.levels[level].weights[0], init.levels[level].weights[0])  # the CMS learned
    assert not np.array_equal(L[0], L[1])  # and what it learned changes the losses


def test_a_model_that_keeps_nothing_has_equal_rows() -> None:
    """Static levels in context mode: nothing persists past forget_context, so every row is the zero-shot row."""
    base = online_hope()
    static = build_variants(base, ["static"], tiny=True, seed=0)["hope-static"]
    tasks = small_tasks(per_task=1, n=3)
    R = class_incremental(ModelLearner(static, TOK, Settings(mode="context")), tasks, candidates="all")
    L = domain_incremental(ModelLearner(static, TOK, Settings(mode="context")), small_stream())
    for M, lower in ((R, False), (L, True)):
        assert (M[0] == M).all()
        m = continual_metrics(M, lower_is_better=lower)
        assert m["bwt"] == 0.0 and m["forgetting"] == 0.0


def test_static_variant_has_the_same_weights_and_no_online_level() -> None:
    base = online_hope()
    models = build_variants(base, ["online", "static"], tiny=True, seed=0)
    online, static = models["hope"], models["hope-static"]
    assert online is not base and base.online_blocks and not static.online_blocks
    assert static.config.cms_online_layers == ()
    assert all(torch.equal(v, static.state_dict()[k]) for k, v in base.state_dict().items())


def test_train_mode_changes_the_weights_of_its_own_copy() -> None:
    model = tiny_model("transformer", 256, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    args = argparse.Namespace(mode="train", steps=2, batch_size=2, lr=1e-3, chunk=64, seed=0, window_len=16)
    learner = make_learner(model, TOK, args)
    learner.learn(small_tasks()[0].learn)
    learner.learn_stream(small_stream()[0].learn)
    assert learner.tasks_learned == 2 and learner.state is None and learner.model is not model
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(before, learner.model.parameters(), strict=True))


def test_label_scores_equal_one_pass_from_the_learned_state() -> None:
    """Prompt and label read in two calls from a repeated batch-3 state score what one pass of each row scores
    from the batch-1 state (the online level learns every 8 tokens; the prompt's 12 tokens end inside a segment)."""
    model = online_hope()
    learner = ModelLearner(model, TOK, Settings(mode="context", batch_size=3))
    learner.learn_stream(small_stream()[0].learn)
    texts = np.stack([x for x, _ in small_tasks(per_task=3)[0].test[:3]])  # [3, 8]
    got = learner.label_scores(texts, ["s0", "s1"])  # [3, 2]
    assert got.shape == (3, 2) and learner.predict(texts, ["s0", "s1"]) == [["s0", "s1"][k] for k in got.argmax(1)]
    for r, c in np.ndindex(3, 2):
        label = learner.label_ids(["s0", "s1"][c])
        ids = torch.tensor([[TOK.eot, *texts[r].tolist(), *TOK.encode(" =>"), *label]])
        with torch.no_grad():
            logits, _ = model(ids[:, :-1], model.forget_context(learner.state))
        want = -next_token_loss(logits[:, -len(label) :], ids[:, -len(label) :], reduction="sum")
        assert got[r, c].item() == pytest.approx(want.item(), abs=1e-4)
    rep = repeat_state(model.forget_context(learner.state), 3)
    assert rep.batch_size == 3 and rep.position == 0


# ---------------------------------------------------------------------------------------------
# the command

SMALLEST = ["--synthetic", "3", "--classes-per-task", "1", "--examples", "2", "--test-examples", "2",
            "--text-len", "8", "--learn-tokens", "48", "--windows", "2", "--window-len", "16", "--steps", "2",
            "--batch-size", "4"]  # fmt: skip


@pytest.mark.parametrize("mode", ["context", "train"])
def test_tiny_end_to_end(mode, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "continual.json"
    main(["eval", "continual", "--tiny", "hope", "--mode", mode, *SMALLEST, "--json", str(out)])
    captured = capsys.readouterr()
    assert "class-incremental" in captured.out and "domain-incremental" in captured.out and "BWT" in captured.out
    assert "after task 3/3" in captured.err
    report = json.loads(out.read_text())
    assert report["kind"] == "continual" and report["config"]["mode"] == mode
    for protocol in ("class", "domain"):
        res = report["numbers"][protocol]
        assert list(res["variants"]) == ["hope", "hope-static", "transformer"]
        for v in res["variants"].values():
            assert np.asarray(v["matrix"]).shape == (3, 3) and {"average", "bwt", "forgetting"} <= set(v)
    assert report["numbers"]["class"]["chance"][0] == [1.0, 0.5, 1 / 3]
    assert (tmp_path / "continual.png").stat().st_size > 0


def test_trained_run_on_its_dataset(run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.json"
    args = ["--classes-per-task", "1", "--examples", "2", "--test-examples", "2", "--text-len", "12",
            "--learn-tokens", "64", "--windows", "2", "--window-len", "16"]  # fmt: skip
    main(["eval", "continual", str(run), "--data", str(data), *args, "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["config"]["sources"] == ["plays", "novels", "essays"]
    assert report["checkpoint"]["step"] == 6
    for protocol in ("class", "domain"):
        assert list(report["numbers"][protocol]["variants"]) == ["hope_attention", "hope_attention-static"]
    assert report["numbers"]["class"]["tasks"] == [["plays"], ["novels"], ["essays"]]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "RUN) or --tiny"),
        (["somewhere", "--tiny", "hope"], "not both"),
        (["--tiny", "mamba"], "unknown variant 'mamba'"),
        (["--tiny", "transformer", "--variants", "static"], "no online CMS levels"),
        (["--tiny", "hope", "--variants", "online,gru"], "unknown variant 'gru'"),
        (["--tiny", "hope", "--variants", "online,hope"], "twice"),
        (["--tiny", "hope", "--protocols", "class,tasks"], "unknown tasks"),
        (["--tiny", "hope", "--mode", "replay"], "invalid choice"),
        (["--tiny", "hope", "--synthetic", "9"], "2 to 6 sources"),
        (["--tiny", "hope", "--synthetic", "2"], "at least two"),
        (["--tiny", "hope", "--examples", "100000"], "fewer than 100000 pieces"),
        (["--tiny", "hope", "--steps", "0"], "--steps must be >= 1"),
        (["--tiny", "transformer", "--text-len", "9000"], "longer than this model's max_seq_len (8192)"),
        (["--tiny", "hope", "--sources", "a,b"], "pass --data"),
        (["--tiny", "hope", "--data", "/nonexistent/data"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(argv, needle, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(["eval", "continual", *argv], capsys)
    assert line.startswith("nestlearn eval continual:") and needle in line, line


def test_a_run_takes_no_family_variant(run: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(["eval", "continual", str(run), "--variants", "online,transformer"], capsys)
    assert "evaluate a transformer run" in line
    line = one_line_error(["eval", "continual", str(run), "--data", str(data), "--sources", "plays,poems"], capsys)
    assert "has no source poems" in line


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        Settings(mode="replay")
    with pytest.raises(ValueError, match="--lr"):
        Settings(lr=0.0)
