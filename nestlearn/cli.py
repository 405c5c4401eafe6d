"""The `nestlearn` command: `nestlearn data fetch NAME...`, `nestlearn data prepare ...`, `nestlearn data verify DIR`,
`nestlearn train ...`, `nestlearn generate ...`, `nestlearn eval TASK ...`, `nestlearn synth ...`,
`nestlearn kernels ...`.

What this is: argument parsing that calls `data.corpora.fetch`, `data.shards.prepare`, `data.shards.Shards.verify`,
`train.main`, `eval.command.main` (generate, eval, synth) and `warm.main` (kernels); every command runs inside
`errors.user_errors`, so a mistake a user can fix is one line on stderr (`nestlearn <cmd>: <message>`, exit status
2; the traceback only with NESTLEARN_DEBUG=1).
What it is not: any of the work itself.
"""

from __future__ import annotations

import argparse
import sys

from .data.corpora import CORPORA, fetch, licence
from .data.shards import Shards, prepare
from .data.tokenizer import get_tokenizer
from .errors import user_errors


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .train import main as train_main

        train_main(argv[1:])
        return
    if argv[:1] == ["kernels"]:
        from .warm import main as kernels_main

        kernels_main(argv[1:])
        return
    if argv[:1] and argv[0] in ("generate", "eval", "synth"):
        from .eval.command import main as eval_main

        eval_main(argv)
        return
    args = _parser().parse_args(argv)
    with user_errors(f"nestlearn data {args.action}"):
        {"fetch": _fetch, "prepare": _prepare, "verify": _verify}[args.action](args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestlearn")
    sub = p.add_subparsers(dest="cmd", required=True)
    data = sub.add_parser("data", help="fetch corpora, prepare shards").add_subparsers(dest="action", required=True)
    f = data.add_parser("fetch", help=f"download corpora into the cache: {', '.join(CORPORA)}")
    f.add_argument("names", nargs="+")
    pr = data.add_parser("prepare", help="tokenise corpora into shards")
    pr.add_argument("--sources", nargs="+", required=True)
    pr.add_argument("--held-out", nargs="*", default=[])
    pr.add_argument("--tokenizer", default="gpt2", help="gpt2, bytes or hf:<local directory>")
    pr.add_argument("--val-fraction", type=float, default=0.05)
    pr.add_argument("--out", required=True)
    v = data.add_parser("verify", help="check a prepared directory: sizes, SHA-256, token ids, document offsets")
    v.add_argument("dir")
    sub.add_parser("train", help="train a model (see `nestlearn train --help`)")
    sub.add_parser("generate", help="stream text from a trained run (see `nestlearn generate --help`)")
    sub.add_parser("eval", help="evaluate a trained run: lm, niah, babilong (see `nestlearn eval --help`)")
    sub.add_parser("synth", help="synthetic tasks (see `nestlearn synth --help`)")
    sub.add_parser("kernels", help="compile a run's GPU kernels ahead of it (see `nestlearn kernels --help`)")
    return p


def _fetch(args: argparse.Namespace) -> None:
    for name in args.names:
        print(f"{name}: {fetch(name)}\n  {licence(name)}")


def _prepare(args: argparse.Namespace) -> None:
    out = prepare(args.sources, get_tokenizer(args.tokenizer), args.out, held_out=args.held_out,
                  val_fraction=args.val_fraction)  # fmt: skip
    print(f"prepared {out}")


def _verify(args: argparse.Namespace) -> None:
    summary = Shards(args.dir).verify(full=True)
    for name, tokens in summary["files"].items():
        print(f"{name:<28} {tokens:>15,} tokens  OK")
    print(f"{args.dir}: {summary['tokens']:,} tokens verified in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    main()
