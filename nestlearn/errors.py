"""How the command line reports what a user can fix: one line on stderr and an exit status, no traceback.

What this is: `user_errors(prog)`, the context manager around every `nestlearn` command. A ValueError, RuntimeError
or OSError (a bad config value, a missing or damaged file, an unreachable registry, a diverged run) becomes
`<prog>: <message on one line>` on stderr and exit status 2, or the exception's own `exit_status` (a diverged
training run: 3); Ctrl-C becomes one line and status 130. `--debug` or `NESTLEARN_DEBUG=1` shows the traceback
instead. Any other exception is a bug and keeps its traceback. `first_line(e)` is the short reason that messages
quote in parentheses. What it is not: the messages themselves (each raiser names the problem and the fix).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

USER_ERROR_STATUS, ABORT_STATUS = 2, 130


@contextmanager
def user_errors(prog: str, *, debug: bool = False, on_abort: str = "aborted") -> Iterator[None]:
    """`with user_errors("nestlearn train"): ...` (see the module docstring)."""
    debug = debug or os.environ.get("NESTLEARN_DEBUG") == "1"
    try:
        yield
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: {on_abort}", file=sys.stderr, flush=True)
        sys.exit(ABORT_STATUS)
    except (ValueError, RuntimeError, OSError) as e:
        if debug:
            raise
        print(f"{prog}: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_status", USER_ERROR_STATUS))


def first_line(e: BaseException) -> str:
    """The first line of the exception's message (its type's name when it has none), for a reason in parentheses."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """The exception's message on one line (an OSError as `file: reason`)."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e).strip() or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines())
