"""The record every evaluation command leaves behind, and its progress lines.

What this is: `write_report(path, kind, config, numbers, loaded=None, seed=None)` writes one JSON file
(atomically) holding what was measured and everything needed to trust or repeat it:

    {"kind": "lm",                          # the evaluation, e.g. "lm", "niah", "babilong", "synth.copy"
     "date": "2026-12-01T10:00:00+00:00",   # UTC, when the report was written
     "commit": "d958ef8+dirty",             # nestlearn.train.code_version() of the code that measured
     "seed": 0,                             # or null
     "config": {...},                       # the command's settings (argparse values, paths as strings)
     "checkpoint": {"path", "run", "step", "sha256", "variant", "tokenizer", "code_version"} or null,
     "numbers": {...}}                      # the results, any JSON tree

Non-finite floats become null (JSON has no NaN), paths and other objects their `str`. `progress(message)`
prints one line on stderr with the seconds since the command began (this module's import), so stdout keeps only
results.
What it is not: the evaluations themselves, or a table printer (each command prints its own).
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import write_text_atomic
from ..train import code_version

if TYPE_CHECKING:
    from .load import Loaded

REPORT_FORMAT = 1
_START = time.perf_counter()


def write_report(
    path: str | Path,
    kind: str,
    config: dict[str, Any],
    numbers: Any,
    loaded: Loaded | None = None,
    seed: int | None = None,
) -> Path:
    """Write the report of one evaluation to `path` (parents created); returns the path.

    `kind`: the evaluation's name; `config`: its settings; `numbers`: its results; `loaded`: the checkpoint
    evaluated (`load_run`'s result), recorded with its SHA-256; `seed`: the seed of any sampling, or None.
    """
    path = Path(path)
    record = {
        "kind": kind,
        "report_format": REPORT_FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": code_version(),
        "seed": seed,
        "config": config,
        "checkpoint": None if loaded is None else checkpoint_record(loaded),
        "numbers": numbers,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(jsonable(record), indent=1, allow_nan=False) + "\n")
    except OSError as e:
        raise ValueError(f"cannot write the report {path} ({e.strerror or e}); choose a writable --json path") from None
    return path


def checkpoint_record(loaded: Loaded) -> dict[str, Any]:
    """What identifies the evaluated weights."""
    info = loaded.info
    keys = ("run", "step", "sha256", "variant", "tokenizer", "code_version")
    return {"path": str(loaded.checkpoint), **{k: info.get(k) for k in keys}}


def jsonable(x: Any) -> Any:
    """A JSON tree: non-finite floats -> None, tuples -> lists, other objects (paths) -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return str(x)


def progress(message: str) -> None:
    """One progress line on stderr: `[  12.3 s] message`."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)
