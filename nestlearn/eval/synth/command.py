"""`nestlearn synth train|eval|list`: synthetic recall and formal-language tasks from the command line.

    nestlearn synth list
    nestlearn synth train --task mqar --variant hope --steps 200 --seed 0 --out runs/mqar_hope
    nestlearn synth eval --task mqar --checkpoint runs/mqar_hope

What this is: argument parsing and printing around `run.train_run` / `run.eval_run`; `main(argv)` is what
`nestlearn synth ARGS` calls (a leading "synth" in argv is skipped). Every mistake (unknown task, variant or
parameter, a bad KEY=VALUE or bin, a missing checkpoint) is one line on stderr naming the choices, exit status 2,
through `nestlearn.errors.user_errors` (`--debug` shows the traceback). Results go to stdout, progress to stderr.
What it is not: the tasks (`tasks.py`, `formal.py`) or the training (`run.py`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from ...errors import user_errors
from ...models.config import VARIANTS
from . import TASKS, make_task
from .tasks import Bin

PROG = "nestlearn synth"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are ValueErrors (one line through `user_errors`) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message} (see {self.prog} --help)")


def parser() -> Parser:
    p = Parser(prog=PROG, description="synthetic recall and formal-language tasks")
    sub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    sub.add_parser("list", help="the tasks, their vocabularies, chance and length bins")
    t = sub.add_parser("train", help="train a small model on a task, evaluate it per length bin")
    t.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    t.add_argument("--variant", default="hope", help=f"one of {', '.join(VARIANTS)} (default hope)")
    t.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    t.add_argument("--seed", type=int, default=0, help="seeds the weights, the training and the test data (default 0)")
    t.add_argument("--out", required=True, help="directory for the checkpoint, report.json and accuracy.png")
    t.add_argument("--batch", type=int, default=32, help="rows per step and per evaluation batch (default 32)")
    t.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (default 3e-3)")
    t.add_argument("--size", default="tiny", help="tiny (default: width 64, 2 blocks), debug, 20M, 60M or 125M")
    t.add_argument("--seq-len", type=int, help="the longest training length (the task's seq_len)")
    t.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE", help="a task parameter")
    t.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="a ModelConfig field")
    add_eval_options(t)
    e = sub.add_parser("eval", help="evaluate a checkpoint of `synth train` per length bin")
    e.add_argument("--checkpoint", required=True, help="the --out directory of `nestlearn synth train`")
    e.add_argument("--task", help="the task it was trained on (checked; default: the recorded one)")
    e.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE", help="change a task parameter")
    e.add_argument("--seed", type=int, help="evaluation seed (default: the training seed, as in report.json)")
    e.add_argument("--json", help="report path (default CHECKPOINT/eval.json; the PNG goes beside it)")
    add_eval_options(e)
    return p


def add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bins", help="test length bins, e.g. 64,65-128,129-256 (default: the task's)")
    p.add_argument("--eval-batches", type=int, help="batches per bin (default 4)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["synth"] else argv
    debug = "--debug" in argv
    with user_errors(PROG, debug=debug):
        args = parser().parse_args([a for a in argv if a != "--debug"])
        {"list": list_tasks, "train": train, "eval": evaluate}[args.action](args)


def list_tasks(_args: argparse.Namespace) -> None:
    from .run import label

    for name, cls in TASKS.items():
        task = cls()
        bins = ", ".join(label(b) for b in task.test_bins())
        args = ", ".join(f"{k}={v}" for k, v in task.args().items())
        print(f"{name:<18} {cls.summary}")
        print(f"{'':<18} vocab {task.vocab_size}, chance {task.chance:.3f}, scored by {task.headline} accuracy; "
              f"bins {bins}; {args}")  # fmt: skip


def train(args: argparse.Namespace) -> None:
    from .run import Settings, table, train_run

    task_args = pairs(args.task_arg, "--task-arg")
    if args.seq_len is not None:
        task_args["seq_len"] = args.seq_len
    task = make_task(args.task, **task_args)
    overrides = model_overrides(pairs(args.model, "--model"))
    s = Settings(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, bins=bins(args.bins),
                 eval_batches=args.eval_batches or 4)  # fmt: skip
    if args.variant not in VARIANTS:
        raise ValueError(f"unknown variant {args.variant!r}; choose one of {', '.join(VARIANTS)}")
    numbers = train_run(task, args.variant, s, args.out, size=args.size, overrides=overrides)
    print(f"{args.variant}, {args.steps} steps ({numbers['train']['seconds']:.1f} s), final loss "
          f"{numbers['train']['final_loss']:.4f}, {numbers['parameters']:,} parameters")  # fmt: skip
    print(table(task, numbers))
    print(f"wrote {args.out}/model.safetensors, model.json, report.json, accuracy.png")


def evaluate(args: argparse.Namespace) -> None:
    from .run import eval_run, table

    if args.task is not None and args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    task, numbers = eval_run(args.checkpoint, task_args=pairs(args.task_arg, "--task-arg"), bins=bins(args.bins),
                             batches=args.eval_batches, seed=args.seed, json_path=args.json,
                             expect_task=args.task)  # fmt: skip
    print(table(task, numbers))


def pairs(items: list[str], option: str) -> dict[str, Any]:
    """`KEY=VALUE` strings -> a dict (values stay strings; each config types them by its fields)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects KEY=VALUE (e.g. {option} seq_len=128), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def model_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from strings, typed by their fields (a typo is named with its closest match)."""
    from ...train.config import check_model_overrides

    try:
        return check_model_overrides(raw)
    except ValueError as e:  # its messages say model_overrides.KEY (the training config's name)
        raise ValueError(str(e).replace("model_overrides.", "--model ")) from None


def bins(text: str | None) -> list[Bin] | None:
    """'64,65-128' -> [(64, 64), (65, 128)]."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not hi)) or int(lo) < 1 or int(hi or lo) < int(lo):
            raise ValueError(f"--bins expects comma-separated lengths or LO-HI ranges like 64,65-128; got {part!r}")
        out.append((int(lo), int(hi or lo)))
    return out


if __name__ == "__main__":
    main()
