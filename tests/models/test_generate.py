"""Generation and reading as a user calls them: every argument of `generate` is checked with a message that names
the fix, ids outside the vocabulary are refused with the likely cause, top-k / top-p keep the tokens they
promise, and a stop token ends each sequence (padded after it) and the whole batch once every sequence has it."""

from __future__ import annotations

import pytest
import torch

from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.models import CausalLM, preset
from nestlearn.models.sampling import sample as _sample
from tests.models.test_lm import tiny


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, r"max_new_tokens must be a positive int, got 0"),
        ({"max_new_tokens": 2.0}, r"max_new_tokens must be a positive int, got 2\.0"),
        ({"temperature": -1.0}, r"temperature must be a finite number >= 0 \(0 = greedy\), got -1\.0"),
        ({"temperature": float("nan")}, r"temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, r"temperature must be a finite number >= 0"),
        ({"top_k": 0}, r"top_k must be None \(no limit\) or an int >= 1, got 0"),
        ({"top_k": 2.5}, r"top_k must be None \(no limit\) or an int >= 1, got 2\.5"),
        ({"top_k": True}, r"top_k must be None"),
        ({"top_p": 0.0}, r"top_p must be None \(off\) or a number in \(0, 1\], got 0\.0"),
        ({"top_p": 1.5}, r"top_p must be None \(off\) or a number in \(0, 1\]"),
        ({"stop_token": 64}, r"stop_token must be None \(never stop\) or a token id in 0 \.\. 63 \(vocab_size = 64\)"),
        ({"stop_token": -1}, r"stop_token must be None \(never stop\) or a token id in 0 \.\. 63"),
    ],
)
def test_bad_generate_arguments_name_the_fix(kwargs: dict, message: str) -> None:
    model = tiny("transformer")
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(torch.randint(0, 64, (1, 4)), **args)


def test_out_of_vocabulary_ids_are_refused_with_the_likely_cause() -> None:
    """The README's GPT-2 ids given to the byte-vocabulary debug preset; a negative id; text of another tokenizer."""
    model = CausalLM(preset("debug", "hope"))
    cause = "tokenizer other than the one the model was trained with"
    with pytest.raises(ValueError, match=rf"token id 3290 is outside .*vocab_size = 256\); .*{cause}"):
        model.generate(torch.tensor([[464, 3290, 318, 257]]), max_new_tokens=50)
    with pytest.raises(ValueError, match=rf"token id -1 is outside .*\(ids 0 \.\. 255, vocab_size = 256\).*{cause}"):
        model.generate(torch.tensor([[3, -1]]), max_new_tokens=2)
    small = tiny("hope")  # 64 ids: the bytes of ASCII letters are beyond it
    with pytest.raises(ValueError, match=rf"token id 111 is outside .*vocab_size = 64\); .*{cause}"):
        small.learn("hello", tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match=r"token id 64 is outside"):
        small.learn(torch.tensor([1, 2, 64]))


def test_top_k_and_top_p_keep_the_tokens_they_promise() -> None:
    """probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two, 0.85 three; top_k 1 is the argmax."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(_sample(logits, 1.0, None, 0.75, gen).tolist()) == {0, 1}
    assert set(_sample(logits, 1.0, None, 0.85, gen).tolist()) == {0, 1, 2}
    assert set(_sample(logits, 1.0, None, 1e-6, gen).tolist()) == {0}
    assert set(_sample(logits, 1.0, None, 1.0, gen).tolist()) == {0, 1, 2, 3}
    assert set(_sample(logits, 1.0, None, 0.6, gen).tolist()) == {0, 1}
    assert set(_sample(logits, 1.0, 2, 0.6, gen).tolist()) == {0}  # top_k first: 0.5 / 0.8 alone reaches 0.6
    shuffled = logits[:, [2, 0, 3, 1]]  # the nucleus is found in vocabulary order too
    assert set(_sample(shuffled, 1.0, None, 0.75, gen).tolist()) == {1, 3}
    model, prompt = tiny("hope"), torch.randint(0, 64, (2, 5))
    greedy, _ = model.generate(prompt, 4, temperature=0)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled, _ = model.generate(prompt, 4, temperature=1.5, generator=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(sampled, greedy)


def test_stop_token_ends_a_single_sequence_early() -> None:
    """The tokens up to and including the stop token come back; the state has read them all, no more."""
    model, prompt = tiny("titans_mag"), torch.randint(0, 64, (1, 5))  # its greedy tokens change (tiny hope's do not)
    free, _ = model.generate(prompt, 12, temperature=0)
    stop = int(free[0, -1])
    n = free[0].tolist().index(stop) + 1
    got, state = model.generate(prompt, 12, temperature=0, stop_token=stop)
    torch.testing.assert_close(got, free[:, :n])
    assert got.shape == (1, n) and 1 < n < 12 and state.position == 5 + n
    with torch.no_grad():
        _, ref = model(torch.cat([prompt, got], 1))
    torch.testing.assert_close(state.blocks, ref.blocks, rtol=0, atol=1e-10)


def test_stop_token_pads_finished_sequences_until_the_batch_is_done() -> None:
    """Each sequence keeps its own greedy tokens up to its stop token, then the stop token; generation ends at the
    step where the last sequence stops (or after max_new_tokens)."""
    model, prompt = tiny("titans_mag"), torch.randint(0, 64, (3, 5))
    free, _ = model.generate(prompt, 10, temperature=0)
    stop = int(free[0, -1])
    want, ends = free.clone(), []
    for row in want:
        end = row.tolist().index(stop) + 1 if stop in row.tolist() else 10
        row[end:] = stop
        ends.append(end)
    assert min(ends) < max(ends) < 10  # the sequences stop at different steps, before the limit
    got, state = model.generate(prompt, 10, temperature=0, stop_token=stop)
    torch.testing.assert_close(got, want[:, : max(ends)])
    assert state.position == 5 + max(ends)


def test_defaults_are_unchanged() -> None:
    """No stop token: exactly max_new_tokens; seeded sampling is reproducible and top_p=1 is no nucleus at all."""
    model, prompt = tiny("titans_mag"), torch.randint(0, 64, (2, 5))
    a, _ = model.generate(prompt, 6, temperature=0.9, generator=torch.Generator().manual_seed(3))
    b, _ = model.generate(prompt, 6, temperature=0.9, top_p=1.0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
