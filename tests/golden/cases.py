"""The golden-loss cases and the function that trains one of them (`run_case`), shared by the test and by
`python -m tests.golden.regenerate` (the only writer of `losses.json`).

What this is: one case per model variant (the `debug` preset as `preset("debug", variant)` builds it) plus HOPE
and Hope-Attention with CMS levels of chunk 8 and 16, which learn online inside the 48-token sequence (the
default levels 512 / 2048 never fire in so short a sequence). `run_case` seeds torch, builds the model, draws
one fixed batch of token ids from a seeded generator and takes `STEPS` plain AdamW steps on it in float32 on
the CPU with one intra-op thread, returning the loss of every step (taken before that step's update, so step k
reflects the k - 1 updates before it). Pure and deterministic: same code, same torch, same CPU -> same bits
(1, 2 and 4 threads gave identical bits on the machine that wrote the curves; test_golden.py has the numbers).
What it is not: a convergence or quality check (6 steps on one batch), a GPU or mixed-precision test, or a user
of anything but the public API (`preset` with `cms_levels` / `cms_lr` overrides, `CausalLM`, `model.loss`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from nestlearn.models import VARIANTS, CausalLM, preset

COMMAND = "python -m tests.golden.regenerate"  # the one way losses.json is written
STEPS = 6  # losses per case
BATCH, SEQ_LEN = 2, 48  # the fixed batch: 2 sequences x 48 tokens
SEED = 1234  # torch.manual_seed before the model is built (its initialisation)
DATA_SEED = 4321  # the generator that draws the batch (its own stream: the batch does not depend on the model)
THREADS = 1  # intra-op threads while a case runs (the bits do not depend on it here; 1 is the fastest on a
# loaded 2-core machine, where spinning OpenMP threads made one 2-thread case take minutes)
# AdamW at lr 1e-3: large enough that every step lowers the loss by 0.1 to 0.9 (a wrong gradient or update moves the
# next loss by far more than the tolerance: lr x 1.01 already moves the curves by 2.5e-4 to 4e-3, relative),
# small enough that these tiny models stay in the smooth regime where float32 rounding differences (CPU kernels)
# are not amplified by the training dynamics (after 6 steps they are still below 1e-6, relative).
LR = 1e-3
ADAMW: dict[str, Any] = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)  # torch's defaults but lr
# CMS levels that learn online inside the sequence (level 1 every 8 tokens, level 2 every 16) at a per-token rate
# of 1e-2 (one rate per level; the static level's is unused). The online updates then move the curves by 5e-4
# (HOPE) and 1e-2 (Hope-Attention), relative, 50 to 1000 times the tolerance; at the default 1e-3 it would be
# about 1e-4, while 1e-1 already slows HOPE's training.
ONLINE: dict[str, Any] = {"cms_levels": (None, 8, 16), "cms_lr": (1e-2, 1e-2, 1e-2)}


@dataclass(frozen=True)
class Case:
    """One golden curve: `preset("debug", variant, **overrides)` trained for `STEPS` steps."""

    name: str
    variant: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The case as JSON stores it (tuples become lists), to notice a case changed without regenerating."""
        return {"variant": self.variant, "overrides": {k: _jsonable(v) for k, v in self.overrides.items()}}


CASES: tuple[Case, ...] = (
    *(Case(v, v) for v in VARIANTS),
    Case("hope_cms_online", "hope", ONLINE),
    Case("hope_attention_cms_online", "hope_attention", ONLINE),
)
# each online case and the case of the same variant whose levels never fire (the online updates are the difference)
ONLINE_PAIRS = (("hope_cms_online", "hope"), ("hope_attention_cms_online", "hope_attention"))


def settings() -> dict[str, Any]:
    """Everything besides the cases that the curves depend on (recorded in losses.json, checked by the test)."""
    return {
        "steps": STEPS, "batch": BATCH, "seq_len": SEQ_LEN, "seed": SEED, "data_seed": DATA_SEED,
        "adamw": _jsonable(ADAMW), "dtype": "float32", "device": "cpu", "threads": THREADS, "preset": "debug",
    }  # fmt: skip


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


@contextlib.contextmanager
def _numerics(threads: int) -> Iterator[None]:
    """float32 default dtype, deterministic algorithms and the given intra-op thread count; all restored after."""
    dtype, before = torch.get_default_dtype(), torch.get_num_threads()
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(det, warn_only=warn)
        torch.set_default_dtype(dtype)


def batch(vocab_size: int) -> torch.Tensor:
    """The fixed batch `[BATCH, SEQ_LEN]` of token ids (the same for every case of a vocabulary)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=gen)


def build(case: Case) -> CausalLM:
    """The case's model in float32 on the CPU, initialised from `SEED`."""
    torch.manual_seed(SEED)
    return CausalLM(preset("debug", case.variant, **case.overrides)).float()


def run_case(case: Case, *, threads: int = THREADS, model: CausalLM | None = None) -> list[float]:
    """Train `case` for `STEPS` AdamW steps on the fixed batch; the loss of every step (before its update).

    `threads`: the intra-op thread count while it runs. `model`: train this model (in place) instead of
    `build(case)`, for experiments that perturb it.
    """
    with _numerics(threads):
        model = build(case) if model is None else model
        model.train()
        ids = batch(model.config.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), **ADAMW)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss, _ = model.loss(ids)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses
