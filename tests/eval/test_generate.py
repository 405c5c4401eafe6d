"""`nestlearn generate` on a tiny trained run: the streamed loop draws the tokens `CausalLM.generate` draws (greedy
and seeded sampling) and leaves the same state; a state saved by one call and continued by the next gives the
text and state of one uninterrupted call; `--no-learn` leaves the CMS untouched; text is streamed without
splitting a character; bad input is one line."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.eval.command import main
from nestlearn.eval.generate import TextStream, stream
from nestlearn.eval.load import load_run
from nestlearn.io import load_bundle, split_tree
from nestlearn.models import save_state
from tests.eval.conftest import one_line_error
from tests.models.test_lm import tiny


def _generate(run: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """stdout of one `nestlearn generate` call (greedy unless told), without its final newline."""
    capsys.readouterr()
    main(["generate", str(run), "--device", "cpu", "--temperature", "0", "--no-stop", *args])
    out, err = capsys.readouterr()
    assert out.endswith("\n") and " tokens/s)" in err
    return out[:-1]


def _tensors(state) -> dict[str, torch.Tensor]:
    return split_tree({"blocks": state.blocks, "pending": state.pending}, "state")[0]


def _assert_same_saved(a: Path, b: Path) -> None:
    for name in ("state", "next_logits"):
        (ta, ma), (tb, mb) = load_bundle(a, name), load_bundle(b, name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        assert ma.get("position") == mb.get("position")


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 20, "top_p": 0.9}])
def test_the_streamed_loop_is_the_library_generate(run, sampling) -> None:
    loaded = load_run(run)
    model, prompt = loaded.model, loaded.tokenizer.encode("To be, or")
    seen: list[int] = []
    ours = stream(model, prompt, max_new_tokens=20, generator=torch.Generator().manual_seed(5), on_token=seen.append,
                  **sampling)  # fmt: skip
    theirs, state = model.generate(torch.tensor([prompt]), 20, generator=torch.Generator().manual_seed(5), **sampling)
    assert ours.tokens == seen == theirs[0].tolist()
    a, b = _tensors(ours.state), _tensors(state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.state.position == state.position == len(prompt) + 20


def test_a_saved_state_continues_as_one_uninterrupted_call(run, tmp_path, capsys) -> None:
    """24 greedy tokens in one call == 10, state saved, then 14 from the saved state (online CMS segment of 8:
    the save falls inside a segment, so its pending tokens travel in the state)."""
    whole = _generate(run, capsys, "--prompt", "To be", "--max-new-tokens", "24", "--state-out", str(tmp_path / "a"))
    first = _generate(run, capsys, "--prompt", "To be", "--max-new-tokens", "10", "--state-out", str(tmp_path / "s"))
    rest = _generate(run, capsys, "--state-in", str(tmp_path / "s"), "--max-new-tokens", "14",
                     "--state-out", str(tmp_path / "b"))  # fmt: skip
    assert first + rest == whole and len(whole) > 0
    _assert_same_saved(tmp_path / "a", tmp_path / "b")


def test_no_learn_leaves_the_cms_as_it_was(run, tmp_path, capsys) -> None:
    model = load_run(run).model
    fresh = _tensors(model.init_state(1))
    for flag in ("--learn", "--no-learn"):
        _generate(run, capsys, "--prompt", "To be, or not", "--max-new-tokens", "12", flag,
                  "--state-out", str(tmp_path / flag))  # fmt: skip
    cms = [k for k in fresh if ".cms.levels." in k and ".weights." in k]
    learned, kept = load_bundle(tmp_path / "--learn", "state")[0], load_bundle(tmp_path / "--no-learn", "state")[0]
    assert cms and all(torch.equal(kept[k], fresh[k]) for k in cms)
    assert any(not torch.equal(learned[k], fresh[k]) for k in cms)


def test_seeded_sampling_repeats(run, capsys) -> None:
    args = ["--prompt", "All the", "--max-new-tokens", "30", "--temperature", "1", "--top-k", "40"]
    a, b = (_generate(run, capsys, *args, "--seed", "7") for _ in range(2))
    assert a == b and a != _generate(run, capsys, *args, "--seed", "8")


def test_text_is_streamed_without_splitting_a_character() -> None:
    text = "héllo ✓ wörld 𝄞!"
    out = io.StringIO()
    writes: list[str] = []
    out.write = lambda s: writes.append(s) or len(s)  # type: ignore[method-assign]
    streamed = TextStream(ByteTokenizer(), out)
    for token in ByteTokenizer().encode(text):
        streamed.push(token)
    assert streamed.close() == text and "".join(writes) == text
    assert not any("\ufffd" in w for w in writes) and len([w for w in writes if w]) > 5  # streamed, piece by piece


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state-in", "{tmp}/none"], r"--state-in .*none holds no saved state \(state.json\); give a directory"),
        (["--state-in", "{tmp}/other"], r"saved by a model with another configuration"),
        (["--top-p", "2"], r"top_p must be None \(off\) or a number in \(0, 1\], got 2.0"),
        (["--max-new-tokens", "0"], r"max_new_tokens must be a positive int, got 0"),
        (["--max-new-tokens", "9000"], r"exceed this hope_attention's max_seq_len \(8,192\); lower --max-new-tokens"),
        (["--temperature", "warm"], r"argument --temperature: invalid float value: 'warm'"),
        (["--device", "cpu", "--cuda-graphs"], r"CUDA graphs need a CUDA device; the model is on cpu"),
    ],
)
def test_bad_generate_input_is_one_line(run, tmp_path, capsys, args, message) -> None:
    save_state(tiny("hope").init_state(1), tmp_path / "other")
    argv = ["generate", str(run), "--prompt", "x", *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    err = one_line_error(argv, capsys)
    assert err.startswith("nestlearn generate: ")
    assert re.search(message, err), err
