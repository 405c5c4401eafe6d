"""The `nestlearn train` command line (also `torchrun --nproc_per_node N -m nestlearn.train ...`).

What this is: `main(argv)`: a config file and `key=value` overrides -> `train`. A mistake in the user's input
(a config value, a path, a damaged checkpoint or dataset, a diverged run) ends with one line on stderr naming the
problem and the fix, and exit status 2 (3 for a diverged run, 130 for an abort); `--debug` or
`NESTLEARN_DEBUG=1` shows the traceback instead. A stop by SIGINT / SIGTERM after its checkpoint exits 0.
What it is not: the training itself (`loop.py`).
"""

from __future__ import annotations

import argparse

from ..errors import user_errors
from .config import load_config
from .loop import train

USAGE = """examples:
  nestlearn train data=data/mix model=20M variant=hope steps=2000 out=runs/hope20m
  nestlearn train --config my.yaml lr=3e-3 model_overrides.cms_lr=1e-3
  torchrun --nproc_per_node 4 -m nestlearn.train --config my.yaml distributed=ddp
A run restarted with the same `out` resumes from its newest intact checkpoint; settings that change the run
(data, model, batch, schedule, optimizer) must then be named in allow_changes=... ."""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nestlearn train", description=__doc__.split("\n\n")[0], epilog=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", default=None, help="a .yaml/.yml or .py config file")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also NESTLEARN_DEBUG=1)")
    p.add_argument("overrides", nargs="*", help="key=value (e.g. data=prepared/shakespeare steps=500)")
    args = p.parse_args(argv)
    with user_errors(
        "nestlearn train", debug=args.debug, on_abort="aborted; work since the last checkpoint is not saved"
    ):
        train(load_config(args.config, args.overrides))
