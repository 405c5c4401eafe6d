"""An lm-eval (EleutherAI's evaluation harness, 0.4.13) model backed by a trained nestlearn run: lm-eval's tasks
score nestlearn models with the same scorer as `nestlearn eval mc`.

What this is: `NestLearnLM`, an `lm_eval.api.model.LM` registered as "nestlearn" when this module is imported
(nothing in nestlearn imports it: the package works without lm-eval; `pip install 'nestlearn[eval]'` adds it).
Built from `run=DIR` (`load_run`, with `tokenizer`; lm-eval's `--device`, the CPU when it names CUDA and there is
none) or from a `Loaded` in memory; `learn` (default True: online CMS levels learn from contexts) and `chunk`
(context tokens per model call) as in `eval mc`.
- `loglikelihood`: requests that share a context are scored together by `mc.score_continuations`: the context
  read once through the state, each continuation from that state without learning; the numbers are those of
  `nestlearn eval mc` on the same (context, continuation) pairs, tokenised as lm-eval's `_encode_pair` does.
- `loglikelihood_rolling`: the log-likelihood of a whole text after the end-of-text separator, read through the
  state in chunks (`lm.stream_nats`, learning unless `learn=False`), as `nestlearn eval lm` reads documents; a
  full-attention model reads past `max_seq_len` in consecutive pieces with the context forgotten between them
  (lm-eval's own models re-read overlapping windows instead).
- `generate_until`: reads `[eot] + context`, then decodes greedily (`do_sample` with `temperature`, `top_k`,
  `top_p` samples) until a stop string, the end-of-text token or `max_gen_toks`; generated tokens are read like
  `nestlearn generate` reads them (learning unless `learn=False`); the stop string is cut off.
Use: `python -m nestlearn.eval.lm_eval_adapter run --model nestlearn --model_args run=runs/x --tasks ...`
(lm-eval's command line with the model registered), or `evaluate(lm, tasks, include_path=...)` from Python.
What it is not: lm-eval itself, its task definitions or datasets (lm-eval downloads those from a hub; local
YAML tasks over local files work offline), or a batched or multi-GPU backend (one context at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"the lm-eval adapter needs lm-eval ({e}); pip install 'nestlearn[eval]'") from e

from ..models.sampling import sample
from .lm import stream_nats
from .load import Loaded, load_run
from .longctx import max_context
from .mc import read_context, score_continuations


@register_model("nestlearn")
class NestLearnLM(LM):
    """A trained nestlearn model for lm-eval (module docstring)."""

    def __init__(
        self,
        run: str | None = None,
        *,
        loaded: Loaded | None = None,
        device: str | None = None,
        tokenizer: str | None = None,
        learn: bool = True,
        chunk: int = 2048,
        max_gen_toks: int = 256,
        seed: int = 0,
        batch_size: Any = None,  # accepted from lm-eval and ignored: one context at a time
        max_batch_size: Any = None,
    ) -> None:
        super().__init__()
        if loaded is None:
            if run is None:
                raise ValueError("NestLearnLM needs a run: --model_args run=DIR (a nestlearn training run)")
            from ..train.loop import resolve_device

            loaded = load_run(run, resolve_device(_device_name(device)), tokenizer=tokenizer)
        self.loaded, self.model, self.tok = loaded, loaded.model, loaded.tokenizer
        self.learn, self.chunk, self.max_gen_toks = bool(learn), int(chunk), int(max_gen_toks)
        self._device = self.model.device
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.identity.get("name", "nestlearn"))

    # ---- log-likelihood

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per request `args = (context, continuation)`."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.args[0], []).append(i)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for context, idx in groups.items():
            conts = [requests[i].args[1] for i in idx]
            read = score_continuations(self.model, self.tok, context, conts, learn=self.learn, chunk=self.chunk)
            for i, s in zip(idx, read.scores, strict=True):
                out[i] = (s.logprob, s.greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i].args, out[i])
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) per request `args = (text,)`, every token predicted once after the separator."""
        out = []
        for r in requests:
            out.append(self.rolling(r.args[0]))
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, out[-1])
        return out

    def rolling(self, text: str) -> float:
        """The summed log-probability of `text`'s tokens after `[eot]` (0.0 for empty text)."""
        ids = torch.tensor([[self.tok.eot, *self.tok.encode(text)]], device=self._device)
        if ids.shape[1] < 2:
            return 0.0
        limit = max_context(self.model)
        return -float(stream_nats(self.model, ids[:, :-1], ids[:, 1:], self.chunk, learn=self.learn, max_len=limit))

    # ---- generation

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each request `args = (context, gen_kwargs)` up to its first stop string."""
        out = []
        for r in requests:
            out.append(self.generate(r.args[0], dict(r.args[1] or {})))
            self.cache_hook.add_partial("generate_until", r.args, out[-1])
        return out

    def generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """Decode after `[eot] + context` (module docstring); `gen_kwargs` as lm-eval passes them."""
        until, max_new, temperature, top_k, top_p = _generation_settings(gen_kwargs, self.max_gen_toks)
        ids = self._fit_prompt([self.tok.eot, *self.tok.encode(context)], max_new)
        logits, state = read_context(self.model, ids, learn=self.learn, chunk=self.chunk)
        new: list[int] = []
        while len(new) < max_new:
            token = int(sample(logits[None].float(), temperature, top_k, top_p, self.generator)[0])
            if token == self.tok.eot:
                break
            new.append(token)
            text = self.tok.decode(new)
            stops = [text.index(s) for s in until if s in text]
            if stops:
                return text[: min(stops)]
            if len(new) < max_new:
                step, state = self.model(torch.tensor([[token]], device=self._device), state, learn=self.learn)
                logits = step[0, -1]
        return self.tok.decode(new)

    def _fit_prompt(self, ids: list[int], max_new: int) -> list[int]:
        """The prompt's last tokens that leave room for `max_new` tokens in a full-attention model."""
        limit = max_context(self.model)
        if limit is None or len(ids) + max_new <= limit:
            return ids
        if max_new >= limit:
            raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in max_seq_len {limit}")
        return ids[-(limit - max_new) :]


def _device_name(device: str | None) -> str:
    """lm-eval's device, or "auto" when none is given or it names CUDA on a machine without it (lm-eval passes
    "cuda:0" by default; its own models fall back to the CPU the same way)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "auto"
    return str(device)


def _generation_settings(
    kw: dict[str, Any], default_max: int
) -> tuple[list[str], int, float, int | None, float | None]:
    """(stop strings, max new tokens, temperature (0 = greedy), top_k, top_p) from lm-eval's gen_kwargs."""
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else [str(s) for s in until]
    max_new = int(kw.get("max_gen_toks", kw.get("max_new_tokens", default_max)))
    temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample") else 0.0
    top_k, top_p = kw.get("top_k"), kw.get("top_p")
    return until, max_new, temperature, None if top_k is None else int(top_k), None if top_p is None else float(top_p)


def evaluate(lm: NestLearnLM, tasks: list[Any], *, include_path: str | Path | None = None,
             include_defaults: bool = True, **kwargs: Any) -> dict[str, Any] | None:  # fmt: skip
    """`lm_eval.simple_evaluate` on `lm` with a TaskManager that also reads the YAML tasks under `include_path`
    (`include_defaults=False`: only those, which skips indexing lm-eval's thousands of tasks). `kwargs` go to
    `simple_evaluate` (limit, num_fewshot, bootstrap_iters, log_samples, ...)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=None if include_path is None else str(include_path),
                          include_defaults=include_defaults)  # fmt: skip
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, **kwargs)


if __name__ == "__main__":  # lm-eval's command line, with "nestlearn" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
