"""The command lines of the evaluation suite: `nestlearn generate`, `nestlearn eval TASK`, `nestlearn synth ...`.

What this is: `main(argv)`, where argv starts with the command word (`["eval", "lm", "runs/x"]`), as
`nestlearn.cli` passes it on. `generate` and `eval lm` are defined here (`generate.py`, `lm.py` do the work);
the other eval tasks come from the modules of `EVAL_MODULES`, each imported at parser build time and exposing
`register(subparsers)`, which adds its subcommand(s) with `set_defaults(func=...)`; `func(args)` then runs
inside `errors.user_errors`. A module that does not exist (yet) is skipped without a word; one that exists but
fails to import is named in a warning on stderr and its tasks are unavailable. `add_run_arguments(parser)` adds
the arguments every task on a trained run shares (RUN, --device, --tokenizer, --json, --debug).
`nestlearn synth ...` is handed to `nestlearn.eval.synth.command.main(argv)`. Every mistake, argument errors
included, is one line on stderr with exit status 2 (the traceback with --debug or NESTLEARN_DEBUG=1).
What it is not: the evaluations themselves, or the `nestlearn data` / `train` commands (`nestlearn/cli.py`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import NoReturn

from ..errors import one_line, user_errors
from . import generate, lm

EVAL_MODULES = {
    "niah": "nestlearn.eval.longctx",
    "babilong": "nestlearn.eval.longctx",
    "mc": "nestlearn.eval.mc",
    "continual": "nestlearn.eval.continual",
}
SYNTH_MODULE = "nestlearn.eval.synth.command"
COMMANDS = ("generate", "eval", "synth")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are ValueErrors (one line through `user_errors`), not usage text."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message}; see `{self.prog} --help`")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["synth"]:
        _synth(argv[1:])
        return
    with user_errors(_prog(argv), debug="--debug" in argv):
        _check_task(argv)
        args = build_parser().parse_args(argv)
        args.func(args)


def build_parser() -> Parser:
    p = Parser(prog="nestlearn", description="generate text from and evaluate trained nestlearn runs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    _generate_parser(sub.add_parser("generate", help="stream text from a trained run (the state keeps learning)"))
    tasks = sub.add_parser("eval", help="evaluate a trained run").add_subparsers(dest="task", required=True)
    _lm_parser(tasks.add_parser("lm", help="loss, perplexity, bits per byte on validation and held-out splits"))
    for module in _eval_modules():
        module.register(tasks)
    sub.add_parser("synth", help="synthetic tasks (see `nestlearn synth --help`)")
    return p


def add_run_arguments(p: argparse.ArgumentParser, *, json: bool = True) -> None:
    """RUN, --device, --tokenizer, --debug (and --json OUT unless `json=False`)."""
    p.add_argument("run", help="a run directory (its newest intact checkpoint) or a checkpoints/step_XXXXXXX dir")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--tokenizer", default=None, help="how to build the run's tokenizer, e.g. hf:<directory>")
    if json:
        p.add_argument("--json", default=None, metavar="OUT", help="write the report (JSON) to OUT")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also NESTLEARN_DEBUG=1)")


def _generate_parser(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, json=False)
    p.add_argument("--prompt", default="", help="text to continue (empty: continue a saved state or start anew)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learn", action=argparse.BooleanOptionalAction, default=True,
                   help="online CMS levels learn from what is read and generated")  # fmt: skip
    p.add_argument("--state-in", default=None, metavar="DIR", help="continue from a state saved by --state-out")
    p.add_argument("--state-out", default=None, metavar="DIR", help="save the state (and next-token logits) here")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay recurrent blocks' one-token calls and online CMS learning steps as CUDA graphs "
                        "(CUDA only)")  # fmt: skip
    p.set_defaults(func=generate.command)


def _lm_parser(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--data", default=None, metavar="DIR", help="prepared dataset (default: the run's own)")
    p.add_argument("--split", nargs="+", default=None, help="splits to score (default: val and every heldout_*)")
    p.add_argument("--windows", type=int, default=16, help="fixed windows per split (0: none)")
    p.add_argument("--window-len", type=int, default=None, help="tokens scored per window (default: the run's seq_len)")
    p.add_argument("--documents", type=int, default=8, help="whole documents per split, read through the state")
    p.add_argument("--chunk", type=int, default=None, help="tokens per forward call in documents (default: window)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward call")
    p.add_argument("--learn", action=argparse.BooleanOptionalAction, default=True,
                   help="online CMS levels learn while reading")  # fmt: skip
    p.set_defaults(func=lm.command)


def _eval_modules() -> list[ModuleType]:
    """The modules of EVAL_MODULES that import (each once)."""
    out = []
    for name in dict.fromkeys(EVAL_MODULES.values()):
        module = _import(name)
        if module is not None:
            out.append(module)
    return out


def _import(name: str) -> ModuleType | None:
    """The module, or None: silently when it does not exist, with a warning when it fails to import."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name is not None and f"{name}.".startswith(f"{e.name}.")
        if not missing:
            print(f"warning: {name} could not be imported ({one_line(e)}); its tasks are unavailable",
                  file=sys.stderr, flush=True)  # fmt: skip
        return None


def _check_task(argv: list[str]) -> None:
    """An eval task whose module is missing is named as such (argparse would call it an invalid choice)."""
    if argv[:1] == ["eval"] and argv[1:2] and argv[1] in EVAL_MODULES and _import(EVAL_MODULES[argv[1]]) is None:
        available = ["lm", *(t for t, m in EVAL_MODULES.items() if _import(m) is not None)]
        raise ValueError(f"eval task {argv[1]!r} is not available in this installation ({EVAL_MODULES[argv[1]]} "
                         f"is missing); available: {', '.join(available)}")  # fmt: skip


def _prog(argv: list[str]) -> str:
    """`nestlearn generate`, `nestlearn eval lm`, ... for the one-line errors."""
    words = argv[:2] if argv[:1] == ["eval"] and argv[1:2] and argv[1] in ("lm", *EVAL_MODULES) else argv[:1]
    return " ".join(["nestlearn", *words])


def _synth(argv: list[str]) -> None:
    with user_errors("nestlearn synth"):
        module = _import(SYNTH_MODULE)
        if module is None:
            raise ValueError(f"synthetic tasks are not available in this installation ({SYNTH_MODULE} is missing)")
    module.main(argv)
