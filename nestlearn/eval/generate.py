"""`nestlearn generate`: text from a trained run, streamed as it is produced, with a learning state that can be
saved and continued in a later call.

What this is: `stream(model, prompt, ...)`, the token-by-token loop of `CausalLM.generate` (the prompt in one
pass, then one `model(token, state)` per sampled token, `models.sampling.sample`) that hands every token to a
callback as soon as it is drawn; `TextStream`, which turns token ids into printable text (a multi-byte character
split across tokens is held back until complete); and `command(args)`. With `--state-out DIR` the state after
the last token (every token read, as `generate` returns it) is saved with `models.save_state`, together with the
next-token logits at that point (bundle `next_logits`), so that `--state-in DIR` with an empty prompt continues
exactly where the call stopped: greedy decoding in two calls gives the same text as one call. With a prompt,
`--state-in` reads the prompt after what the state holds. Without a prompt or saved logits, generation starts a
new document (the tokenizer's end-of-text token). Generation stops at the end-of-text token unless
`--no-stop`. `--no-learn` keeps the online CMS levels from learning (the sequence mixers still read every token).
`--cuda-graphs` replays the recurrent blocks' one-token calls and the online CMS's learning steps as CUDA graphs
(`models.graphs.DecodeGraphs`).
What it is not: batched generation (`CausalLM.generate`), or the Hugging Face adapter's `generate`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor

from ..data.tokenizer import Tokenizer
from ..io import load_bundle, save_bundle
from ..models import CausalLM, ModelState, load_state, save_state
from ..models.graphs import DecodeGraphs
from ..models.sampling import check_sampling, sample
from ..train.loop import resolve_device
from .lm import max_context
from .load import load_run
from .report import progress

LOGITS = "next_logits"
LOGITS_KIND = "nestlearn.next_logits"
HOLD_BACK = 8  # tokens a split character may span before the replacement character is printed anyway


@dataclass
class Generated:
    """The sampled ids, whether the stop token ended generation, the state after every token was read, and the
    next-token logits at that point `[1, V]`."""

    tokens: list[int]
    stopped: bool
    state: ModelState
    next_logits: Tensor


@torch.no_grad()
def stream(
    model: CausalLM,
    prompt: list[int],
    state: ModelState | None = None,
    next_logits: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
    learn: bool = True,
    on_token: Callable[[int], None] = lambda _: None,
) -> Generated:
    """Read `prompt` (ids) after `state`, or sample first from `next_logits` `[1, V]` when the prompt is empty;
    then sample up to `max_new_tokens`, calling `on_token(id)` for each one as it is drawn (one host sync per
    token). Greedy at temperature 0; the stop token ends generation after it is read."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if prompt:
        ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        model.check_vocabulary(ids)
        logits, state = model(ids, state, learn=learn)
        next_logits = logits[:, -1]
    if next_logits is None or state is None:
        raise ValueError("nothing to continue from: give a prompt, or a state saved with its next-token logits")
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        nxt = sample(next_logits.float(), temperature, top_k, top_p, generator)
        tokens.append(int(nxt[0]))
        on_token(tokens[-1])
        logits, state = model(nxt[:, None], state, learn=learn)  # the memories read every token
        next_logits = logits[:, -1]
        if tokens[-1] == stop_token:
            break
    return Generated(tokens, bool(tokens) and tokens[-1] == stop_token, state, next_logits)


class TextStream:
    """Token ids in, printable text out: the text of all ids so far is decoded, and what was not yet written is
    written, except a trailing incomplete character (for up to HOLD_BACK tokens)."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written, self.held = "", 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and self.held < HOLD_BACK:
            self.held += 1
            return
        self._write(text)

    def close(self) -> str:
        """Write what is left; returns the whole text."""
        self._write(self.tokenizer.decode(self.ids))
        return self.written

    def _write(self, text: str) -> None:
        self.out.write(text[len(self.written) :])
        self.out.flush()
        self.written, self.held = text, 0


def save(generated: Generated, directory: str | Path) -> None:
    """The state (`save_state`) and the next-token logits beside it."""
    save_state(generated.state, directory)
    meta = {"kind": LOGITS_KIND, "fingerprint": generated.state.fingerprint, "position": generated.state.position}
    save_bundle(directory, LOGITS, {"logits": generated.next_logits}, meta)


def load(directory: str | Path, model: CausalLM) -> tuple[ModelState, Tensor | None]:
    """A saved state and its next-token logits (None when the directory has none for this very state)."""
    directory = Path(directory)
    if not (directory / "state.json").is_file():
        raise ValueError(f"--state-in {directory} holds no saved state (state.json); give a directory written by "
                         "--state-out or nestlearn.models.save_state")  # fmt: skip
    state = load_state(directory, model)
    if not (directory / f"{LOGITS}.json").is_file():
        return state, None
    tensors, meta = load_bundle(directory, LOGITS)
    same = meta.get("kind") == LOGITS_KIND and (meta.get("fingerprint"), meta.get("position")) == (
        state.fingerprint, state.position)  # fmt: skip
    return state, tensors["logits"].to(device=model.device, dtype=_dtype(model)) if same else None


def _dtype(model: CausalLM) -> torch.dtype:
    return model.embed.weight.dtype


def command(args: argparse.Namespace) -> None:
    """`nestlearn generate` (see the module docstring): the text on stdout, a summary on stderr."""
    loaded = load_run(args.run, resolve_device(args.device), tokenizer=args.tokenizer)
    model, tok = loaded.model, loaded.tokenizer
    state, logits = load(args.state_in, model) if args.state_in else (None, None)
    prompt = tok.encode(args.prompt)
    if not prompt and logits is None:
        prompt = [tok.eot]  # a new document
    _check_length(model, state, len(prompt), args.max_new_tokens)
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    text = TextStream(tok, sys.stdout)
    start = time.perf_counter()
    with DecodeGraphs(model) if args.cuda_graphs else contextlib.nullcontext():
        out = stream(model, prompt, state, logits, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, stop_token=None if args.no_stop else tok.eot,
                     generator=gen, learn=args.learn, on_token=text.push)  # fmt: skip
    text.close()
    print(flush=True)
    seconds = time.perf_counter() - start
    said = f"{len(out.tokens)} tokens in {seconds:.1f} s ({len(out.tokens) / max(seconds, 1e-9):.1f} tokens/s)"
    if out.stopped:
        said += ", stopped at end-of-text"
    if args.state_out:
        save(out, args.state_out)
        said += f"; state ({out.state.position:,} tokens read) saved to {args.state_out}"
    progress(said)


def _check_length(model: CausalLM, state: ModelState | None, prompt: int, new: int) -> None:
    """Refuse up front what a full-attention model could not finish (it stops at max_seq_len)."""
    limit, start = max_context(model), 0 if state is None else state.position
    if limit is not None and start + prompt + new > limit:
        raise ValueError(
            f"{start:,} tokens in the state + {prompt:,} of prompt + {new:,} new ones exceed this "
            f"{model.config.variant}'s max_seq_len ({limit:,}); lower --max-new-tokens"
            + (" or start without --state-in" if start else "")
        )
