"""A model that learns a fact from a document and recalls it later from its saved state alone.

A small Hope-Attention model (untrained, byte-level tokens) reads a document; its online CMS levels learn from
the document's next-token loss (D10). The state is saved, loaded in a new call, and the context is forgotten
(`forget_context`: the attention cache is emptied, only what the CMS learned remains). The script prints the
loss of the fact's answer after a prompt, and of a wrong answer of the same length as a control, before and
after, with the greedy continuation.

    python -m examples.learn_a_fact
"""

from __future__ import annotations

import tempfile

import torch

from nestlearn import demo
from nestlearn.models import CausalLM, load_state, preset, save_state

DOCUMENT = "Notes from the old house. The key to the blue door is under the third stone. " * 4
PROMPT, ANSWER, WRONG = "The key to the blue door is under the", " third stone.", " fifth plank."


def encode(text: str) -> torch.Tensor:
    return torch.tensor([list(text.encode())])


def answer_loss(model: CausalLM, state, answer: str) -> float:
    """Mean next-token loss (nats per byte) of `answer` after PROMPT, read without learning."""
    return demo.answer_loss(model, state, PROMPT, answer)


def continuation(model: CausalLM, state) -> str:
    """The greedy continuation of PROMPT, as long as ANSWER, without learning from it."""
    new, _ = model.generate(encode(PROMPT), len(ANSWER), state, temperature=0, learn_generated=False)
    return bytes(new[0].tolist()).decode(errors="replace")


def run() -> dict[str, tuple[float, float, str]]:
    """{"before" / "after": (loss of ANSWER, loss of WRONG, greedy continuation)}."""
    torch.manual_seed(0)
    cfg = preset("debug", "hope_attention", cms_levels=(None, 16), cms_lr=(0.0, 0.5), init_std=0.1)
    model = CausalLM(cfg)
    state = model.learn(encode(DOCUMENT))
    with tempfile.TemporaryDirectory() as d:
        save_state(state, d)
        later = model.forget_context(load_state(d, model))  # a later call: saved state only, no context
    out = {}
    for label, st in (("before", model.init_state(1)), ("after", later)):
        out[label] = (answer_loss(model, st, ANSWER), answer_loss(model, st, WRONG), continuation(model, st))
    return out


def main() -> None:
    for label, (right, wrong, text) in run().items():
        print(f"{label:6s}: loss of {ANSWER!r} {right:.3f}, of {WRONG!r} {wrong:.3f}; greedy: {text!r}")


if __name__ == "__main__":
    main()
