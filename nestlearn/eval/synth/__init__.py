"""Synthetic tasks for sequence models: recall (MQAR and the MAD tasks) and formal languages, with a trainer
and the `nestlearn synth` command.

What this is: the task registry (`TASKS`, `make_task`) over `tasks.py` (MQAR, the MAD tasks, the state-size
report) and `formal.py` (the languages of the paper's Table 5); `run.py` trains a small model on one task and
scores it per length bin; `command.py` is `nestlearn synth train|eval|list`. What it is not: language-model
evaluation (`nestlearn.eval`), or a benchmark with published numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .formal import FORMAL_TASKS, FormalTask
from .tasks import IGNORE, RECALL_TASKS, Batch, Task, state_bytes, state_report

TASKS: dict[str, type[Task]] = {**RECALL_TASKS, **FORMAL_TASKS}


def make_task(name: str, **args: Any) -> Task:
    """The task `name` with its parameters (`seq_len`, `vocab`, ...; strings are typed by the field). Unknown
    names and parameters are refused with the choices."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    cls = TASKS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"{name} has no parameter {', '.join(unknown)}; its parameters: {', '.join(valid)}")
    return cls(**args)


__all__ = ["IGNORE", "TASKS", "Batch", "FormalTask", "Task", "make_task", "state_bytes", "state_report"]
