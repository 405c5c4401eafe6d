"""Regenerate the golden loss curves: `python -m tests.golden.regenerate` writes tests/golden/losses.json.

What this is: the only writer of losses.json. It runs every case of `cases.py` and stores the curves with what
they were made with (torch version, date, this command, CPU capability, the settings). Run it when a change of
training numerics is intended, and commit the new file with that change, saying why the numbers moved.
`--check` writes nothing: it runs every case with 1, 2 and 4 threads and prints the largest relative difference
from the committed curves (to measure the spread on another machine or torch build; the tolerance is in
test_golden.py).
What it is not: a test (pytest never writes the file) or a benchmark.

    python -m tests.golden.regenerate [--check]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .cases import CASES, COMMAND, run_case, settings

PATH = Path(__file__).with_name("losses.json")


def regenerate() -> dict[str, Any]:
    """Run every case and return the file's content (metadata, settings, one curve per case)."""
    curves = {}
    for case in CASES:
        t0 = time.perf_counter()
        losses = run_case(case)
        curves[case.name] = {**case.describe(), "losses": losses}
        print(f"{case.name:28s} {time.perf_counter() - t0:5.1f} s  " + " ".join(f"{x:.6f}" for x in losses))
    meta = {
        "command": COMMAND,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return {"meta": meta, "settings": settings(), "cases": curves}


def check(threads: tuple[int, ...] = (1, 2, 4)) -> float:
    """Largest relative difference between the committed curves and fresh runs at each thread count."""
    committed = json.loads(PATH.read_text())["cases"]
    worst = 0.0
    for case in CASES:
        golden = committed[case.name]["losses"]
        diffs = []
        for t in threads:
            got = run_case(case, threads=t)
            diffs.append(max(abs(a - b) / abs(b) for a, b in zip(got, golden, strict=True)))
        worst = max(worst, *diffs)
        print(f"{case.name:28s} " + "  ".join(f"{t} thr: {d:.2e}" for t, d in zip(threads, diffs, strict=True)))
    print(f"largest relative difference from {PATH.name}: {worst:.2e}")
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed curves at 1, 2, 4 threads")
    args = ap.parse_args(argv)
    if args.check:
        check()
        return 0
    data = regenerate()
    PATH.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
