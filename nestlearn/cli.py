"""The `nestlearn` command: `nestlearn data fetch NAME...`, `nestlearn data prepare ...`, `nestlearn train ...`.

What this is: argument parsing that calls `data.corpora.fetch`, `data.shards.prepare` and `train.main`, turning
bad input into one-line errors that name the fix. What it is not: any of the work itself.
"""

from __future__ import annotations

import argparse
import sys

from .data.corpora import CORPORA, fetch, licence
from .data.shards import prepare
from .data.tokenizer import get_tokenizer


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .train import main as train_main

        train_main(argv[1:])
        return
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
    sub.add_parser("train", help="train a model (see `nestlearn train --help`)")
    args = p.parse_args(argv)
    try:
        if args.action == "fetch":
            for name in args.names:
                print(f"{name}: {fetch(name)}\n  {licence(name)}")
        else:
            out = prepare(args.sources, get_tokenizer(args.tokenizer), args.out, held_out=args.held_out,
                          val_fraction=args.val_fraction)  # fmt: skip
            print(f"prepared {out}")
    except (ValueError, RuntimeError) as e:
        sys.exit(f"nestlearn: {e}")


if __name__ == "__main__":
    main()
