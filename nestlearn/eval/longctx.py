"""Long-context recall evaluation: the scorer that streams a context through a model's state, the NIAH and
BABILong grids, their heatmaps, and the commands `nestlearn eval niah` and `nestlearn eval babilong`.

What this is: `score_sample(model, tokenizer, sample)` reads a sample's context (`niah.py`, `babilong.py`)
through `model(ids, state) -> (logits, state)`, `chunk` tokens per call with the state passed on, keeping only the
last logits (a recurrent model reaches 128K tokens and more; there is never a full-context logits tensor). Each
query then continues from that context state, and is scored two ways:
- greedy: the model generates as many tokens as the reference answer (" " + the values joined by ", ") has; an
  answer value counts as found when it occurs in the decoded generation as a whole word (\\w boundaries). With a
  single value and that token budget this is exact match of the value string; a multi-value query scores the
  fraction of its values found (RULER's string_match_all).
- likelihood rank: each true value is ranked against the query's wrong values (in-text distractor values first,
  then fresh ones of the same kind) by the mean log-probability per token of " " + value after the prompt
  (length-normalised, so values of different token lengths compete fairly and a model that knows nothing scores
  chance exactly). Ties count as ties: `mean_rank` is the mid-rank (1 = best) and `rank_top1` the expected
  top-1 accuracy under random tie-breaking (1 / (1 + number tied) when nothing scores higher), so a uniform model
  scores 1 / candidates.
Every token, the answer's included, goes through `model(ids, state)` with the model's defaults (an online CMS
learns from what it reads, as in `CausalLM.generate`), so a query's scores equal those of reading context +
question + answer in one pass. A full-attention model (Transformer++, Hope-Attention) reads at most
`max_seq_len` tokens: a longer sample is refused with one line, and a grid skips those lengths, recording why.
`run_niah` and `run_babilong` score grids (task x length x depth, task x length) and return JSON-ready dicts;
`plot_niah` / `plot_babilong` draw heatmaps (matplotlib, imported when called). Progress goes to a callback
(`progress`); the commands print it on stderr.
What it is not: sample generation (`niah.py`, `babilong.py`), run loading (`load.py`) or report writing
(`report.py`).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.config import FULL_ATTENTION
from . import babilong as bl
from . import niah
from .niah import Haystack, Noise, Query, Sample, TooShort

Progress = Callable[[str], None]
TIE = 1e-9  # scores closer than this (nats per token) are tied


@dataclass(frozen=True)
class QueryScore:
    """One query's result. Per answer value: `found` (in the greedy generation), `scores` (mean log-prob per
    token of the value, then of each wrong value), `rank` (mid-rank among them, 1 = best) and `top1` (expected
    top-1 under random tie-breaking)."""

    answers: tuple[str, ...]
    generated: str
    found: tuple[bool, ...]
    scores: tuple[tuple[float, ...], ...]
    rank: tuple[float, ...]
    top1: tuple[float, ...]


# ---------------------------------------------------------------------------------------------------------
# reading and scoring


def max_context(model: Any) -> int | None:
    """The most tokens `model` can read (`max_seq_len` of a full-attention variant), or None when unbounded."""
    cfg = getattr(model, "config", None)
    return cfg.max_seq_len if getattr(cfg, "variant", None) in FULL_ATTENTION else None


def too_long(model: Any, length: int) -> str | None:
    """Why `model` cannot read `length` tokens, or None when it can."""
    limit = max_context(model)
    if limit is None or length <= limit:
        return None
    return (
        f"{model.config.variant} attends over its whole context and reads at most max_seq_len = {limit:,} tokens, "
        f"but this sample needs {length:,}; use lengths up to {limit:,}, a recurrent variant (hope, titans_*), "
        "or a model built with a larger max_seq_len"
    )


@torch.no_grad()
def read(
    model: Any,
    ids: Sequence[int],
    state: Any = None,
    *,
    chunk: int = 2048,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[Tensor, Any]:
    """Feed `ids` `chunk` tokens per call with the state passed on. -> logits `[V]` after the last token, state.

    Only the last row of each call's logits `[1, chunk, V]` is kept; `on_chunk(tokens read)` follows each call."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if not ids:
        raise ValueError("nothing to read: the token sequence is empty")
    device, last = _device(model), None
    for start in range(0, len(ids), chunk):
        logits, state = model(torch.tensor([list(ids[start : start + chunk])], device=device), state)
        last = logits[0, -1]
        del logits
        if on_chunk is not None:
            on_chunk(min(start + chunk, len(ids)))
    assert last is not None
    return last, state


@torch.no_grad()
def greedy(model: Any, logits: Tensor, state: Any, n: int) -> list[int]:
    """`n` tokens by argmax from logits `[V]` (the next token's) and the state that produced them."""
    out: list[int] = []
    for i in range(n):
        out.append(int(logits.argmax()))
        if i + 1 < n:
            step, state = model(torch.tensor([[out[-1]]], device=_device(model)), state)
            logits = step[0, -1]
    return out


@torch.no_grad()
def continuation_score(model: Any, logits: Tensor, state: Any, tokens: Sequence[int]) -> float:
    """Mean log-probability per token of `tokens` `[m]` following logits `[V]` and its state (float64)."""
    rows = [logits[None]]
    if len(tokens) > 1:
        more, _ = model(torch.tensor([list(tokens[:-1])], device=_device(model)), state)
        rows.append(more[0])
    logp = torch.log_softmax(torch.cat(rows).double(), dim=-1)  # [m, V]
    return float(logp[torch.arange(len(tokens)), torch.tensor(tokens, device=logp.device)].mean())


def rank(scores: Sequence[float]) -> tuple[float, float]:
    """scores[0] (the true value's) among all -> (mid-rank, expected top-1 under random tie-breaking)."""
    above = sum(s > scores[0] + TIE for s in scores[1:])
    tied = sum(abs(s - scores[0]) <= TIE for s in scores[1:])
    return 1 + above + tied / 2, (1 / (1 + tied) if above == 0 else 0.0)


def score_query(model: Any, tokenizer: Any, logits: Tensor, state: Any, query: Query, chunk: int = 2048) -> QueryScore:
    """Read the query's prompt after the context (logits `[V]`, state) and score its answer both ways."""
    logits, state = read(model, query.prompt, state, chunk=chunk)
    generated = tokenizer.decode(greedy(model, logits, state, len(tokenizer.encode(query.target))))
    values = dict.fromkeys((*query.answers, *query.distractors))
    for v in values:
        values[v] = continuation_score(model, logits, state, tokenizer.encode(" " + v))
    scores = tuple((values[a], *(values[d] for d in query.distractors)) for a in query.answers)
    ranks = [rank(s) for s in scores]
    found = tuple(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", generated) is not None for a in query.answers)
    return QueryScore(query.answers, generated, found, scores, tuple(r for r, _ in ranks), tuple(t for _, t in ranks))


def score_sample(
    model: Any, tokenizer: Any, sample: Sample, *, chunk: int = 2048, on_chunk: Callable[[int], None] | None = None
) -> list[QueryScore]:
    """Stream the sample's context, then score every query from the context's state (module docstring).
    Refuses (ValueError, one line) a sample longer than a full-attention model's `max_seq_len`."""
    reason = too_long(model, sample.length)
    if reason:
        raise ValueError(reason)
    _check_vocabulary(model, sample)
    logits, state = read(model, sample.context, chunk=chunk, on_chunk=on_chunk)
    return [score_query(model, tokenizer, logits, state, q, chunk) for q in sample.queries]


# ---------------------------------------------------------------------------------------------------------
# grids


def run_niah(
    model: Any,
    tokenizer: Any,
    *,
    tasks: Sequence[str] = ("single",),
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 4,
    haystack: Haystack | None = None,
    seed: int = 0,
    chunk: int = 2048,
    needles: int = 4,
    kind: str = "number",
    candidates: int = 10,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every (task, length, depth) cell over `samples` samples. -> {"tasks": {task: {"cells": [...], "exact",
    "rank_top1", "mean_rank", "chance_top1"}}, "skipped_lengths": {length: reason}}."""
    hay = haystack or Noise()
    skipped = _check_grid(model, lengths, samples)
    out: dict[str, Any] = {"tasks": {}, "skipped_lengths": {str(n): r for n, r in skipped.items()}}
    for task in tasks:
        cells = []
        for length in lengths:
            for depth in depths:
                build = partial(niah.niah_sample, task, tokenizer, length, depth, hay, needles=needles, kind=kind,
                                candidates=candidates)  # fmt: skip
                label = f"niah {task} length {fmt_length(length)} depth {depth:.0%}"
                cell = _cell(model, tokenizer, build, samples, seed, chunk, skipped.get(length), label, progress)
                cells.append({"length": length, "depth": depth, **cell})
        out["tasks"][task] = {"cells": cells, **_mean(cells)}
    return _all_skipped(out)


def run_babilong(
    model: Any,
    tokenizer: Any,
    *,
    tasks: Sequence[str] = bl.TASKS,
    lengths: Sequence[int] = (0, 1024, 2048, 4096),
    samples: int = 10,
    haystack: Haystack | None = None,
    seed: int = 0,
    chunk: int = 2048,
    facts: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every (task, length) cell over `samples` stories (the same stories at every length; length 0 = the facts
    alone). `haystack` defaults to the noise sentences; BABILong's is a book (`niah.load_haystack("austen")`)."""
    hay = haystack or Noise()
    skipped = _check_grid(model, lengths, samples)
    out: dict[str, Any] = {"tasks": {}, "skipped_lengths": {str(n): r for n, r in skipped.items()}}
    for task in tasks:
        cells = []
        for length in lengths:
            build = partial(bl.babilong_sample, task, tokenizer, length, hay, facts=facts)
            label = f"babilong {task} length {fmt_length(length)}"
            cell = _cell(model, tokenizer, build, samples, seed, chunk, skipped.get(length), label, progress)
            cells.append({"length": length, **cell})
        out["tasks"][task] = {"cells": cells, **_mean(cells)}
    return _all_skipped(out)


def _cell(
    model: Any,
    tokenizer: Any,
    build: Callable[[str], Sample],
    samples: int,
    seed: int,
    chunk: int,
    skip: str | None,
    label: str,
    progress: Progress | None,
) -> dict[str, Any]:
    """Score `samples` samples of one cell (`build(seed)`, sample i's seed "{seed}:{i}") -> its means and
    per-query records, or {"skipped": reason}."""
    if skip:
        return {"skipped": skip}
    records, start = [], time.perf_counter()
    for i in range(samples):
        try:
            sample = build(f"{seed}:{i}")
        except TooShort as e:
            _say(progress, f"{label}: skipped: {e}")
            return {"skipped": str(e)}
        t0 = time.perf_counter()
        beat = _heartbeat(progress, f"{label} sample {i + 1}/{samples}", len(sample.context))
        scores = score_sample(model, tokenizer, sample, chunk=chunk, on_chunk=beat)
        for q, score in zip(sample.queries, scores, strict=True):
            records.append({"sample": i, "question": q.text, "distractors": q.distractors, **asdict(score)})
        mine = [r for r in records if r["sample"] == i]
        took = time.perf_counter() - t0
        _say(progress, f"{label} sample {i + 1}/{samples}: exact {_avg(mine, 'found'):.2f}, rank-1 "
                       f"{_avg(mine, 'top1'):.2f} ({sample.length:,} tokens, {took:.1f} s)")  # fmt: skip
    chance = [1 / len(s) for r in records for s in r["scores"]]
    return {"samples": samples, "exact": _avg(records, "found"), "rank_top1": _avg(records, "top1"),
            "mean_rank": _avg(records, "rank"), "chance_top1": sum(chance) / len(chance),
            "seconds": round(time.perf_counter() - start, 3), "records": records}  # fmt: skip


def _check_grid(model: Any, lengths: Sequence[int], samples: int) -> dict[int, str]:
    """The lengths the model cannot read, with why; refuses a grid with nothing left to score."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if not lengths or any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of token counts >= 0, got {list(lengths)}")
    skipped = {n: r for n in lengths if (r := too_long(model, n))}
    if len(skipped) == len(set(lengths)):
        raise ValueError(next(iter(skipped.values())))
    return skipped


def _all_skipped(out: dict[str, Any]) -> dict[str, Any]:
    cells = [c for t in out["tasks"].values() for c in t["cells"]]
    if cells and all("skipped" in c for c in cells):
        raise ValueError(f"no cell could be scored: {cells[0]['skipped']}")
    return out


def _mean(cells: list[dict[str, Any]]) -> dict[str, float | None]:
    done = [c for c in cells if "skipped" not in c]
    keys = ("exact", "rank_top1", "mean_rank", "chance_top1")
    return {k: (sum(c[k] for c in done) / len(done) if done else None) for k in keys}


def _avg(records: list[dict[str, Any]], key: str) -> float:
    vals = [float(v) for r in records for v in r[key]]
    return sum(vals) / len(vals) if vals else math.nan


def _heartbeat(progress: Progress | None, label: str, total: int, every: float = 10.0) -> Callable[[int], None]:
    """An `on_chunk` that reports the tokens read at most every `every` seconds."""
    last = [time.perf_counter()]

    def beat(done: int) -> None:
        if progress is not None and time.perf_counter() - last[0] >= every and done < total:
            last[0] = time.perf_counter()
            progress(f"{label}: read {done:,} of {total:,} context tokens")

    return beat


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


def _device(model: Any) -> torch.device:
    return getattr(model, "device", None) or torch.device("cpu")


def _check_vocabulary(model: Any, sample: Sample) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = max(max(sample.context), *(max(q.prompt) for q in sample.queries))
    if vocab is not None and top >= vocab:
        raise ValueError(
            f"the tokenizer produced id {top} but the model's vocabulary has {vocab} ids; evaluate with the "
            "tokenizer the model was trained with"
        )


# ---------------------------------------------------------------------------------------------------------
# heatmaps and tables


def fmt_length(n: int) -> str:
    """1024 -> "1K", 131072 -> "128K", 1000 -> "1000"."""
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def plot_niah(results: dict[str, Any], path: str | Path) -> Path:
    """Heatmaps depth (rows) x length (columns), one row of panels per task: greedy exact, likelihood top-1."""
    panels = []
    for task, res in results["tasks"].items():
        lengths = sorted({c["length"] for c in res["cells"]})
        depths = sorted({c["depth"] for c in res["cells"]})
        cell = {(c["depth"], c["length"]): c for c in res["cells"]}
        for key, what in (("exact", "greedy exact match"), ("rank_top1", "likelihood rank top-1")):
            grid = [[cell[d, n].get(key) for n in lengths] for d in depths]
            panels.append((f"{task}: {what}", grid, [f"{d:.0%}" for d in depths], [fmt_length(n) for n in lengths]))
    return _heatmaps(panels, "context length (tokens)", "needle depth", path)


def plot_babilong(results: dict[str, Any], path: str | Path) -> Path:
    """Heatmaps task (rows) x length (columns): greedy exact, likelihood top-1."""
    tasks = list(results["tasks"])
    lengths = sorted({c["length"] for t in tasks for c in results["tasks"][t]["cells"]})
    cell = {(t, c["length"]): c for t in tasks for c in results["tasks"][t]["cells"]}
    panels = [
        (
            f"babilong: {what}",
            [[cell[t, n].get(key) for n in lengths] for t in tasks],
            tasks,
            [fmt_length(n) for n in lengths],
        )
        for key, what in (("exact", "greedy exact match"), ("rank_top1", "likelihood rank top-1"))
    ]
    return _heatmaps(panels, "context length (tokens)", "task", path)


def _heatmaps(panels: list[tuple[str, list[list[Any]], list[str], list[str]]], xlabel: str, ylabel: str,
              path: str | Path) -> Path:  # fmt: skip
    """Panels (title, grid rows x columns of values in [0, 1] or None = skipped, row labels, column labels),
    two per row of the figure, written as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("the heatmap needs matplotlib: pip install 'nestlearn[plot]'") from e
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.2 * rows + 0.5), squeeze=False)
    for ax, (title, grid, ylabels, xlabels) in zip(axes.flat, panels, strict=False):
        values = [[math.nan if v is None else v for v in row] for row in grid]
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
        ax.imshow(values, vmin=0, vmax=1, cmap=cmap, aspect="auto")
        for (i, j), v in ((ij, v) for ij, v in _cells(grid)):
            ax.text(j, i, "skip" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xticks=range(len(xlabels)), yticks=range(len(ylabels)))
        ax.set_xticklabels(xlabels)
        ax.set_yticklabels(ylabels)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cells(grid: list[list[Any]]) -> list[tuple[tuple[int, int], Any]]:
    return [((i, j), v) for i, row in enumerate(grid) for j, v in enumerate(row)]


def niah_table(results: dict[str, Any]) -> str:
    """Per task: rows = lengths, columns = depths, each entry "greedy exact / likelihood top-1"."""
    lines = []
    for task, res in results["tasks"].items():
        depths = sorted({c["depth"] for c in res["cells"]})
        lines.append(f"{task}: greedy exact / likelihood top-1 (chance {_fmt(res['chance_top1'])})")
        lines.append(f"  {'length':>8}" + "".join(f"{f'depth {d:.0%}':>13}" for d in depths))
        for n in sorted({c["length"] for c in res["cells"]}):
            row = {c["depth"]: c for c in res["cells"] if c["length"] == n}
            lines.append(f"  {fmt_length(n):>8}" + "".join(f"{_entry(row[d]):>13}" for d in depths))
    return "\n".join(lines)


def babilong_table(results: dict[str, Any]) -> str:
    """Rows = tasks, columns = lengths, each entry "greedy exact / likelihood top-1"."""
    tasks = results["tasks"]
    lengths = sorted({c["length"] for t in tasks.values() for c in t["cells"]})
    lines = ["babilong: greedy exact / likelihood top-1",
             f"  {'task':<6}{'chance':>7}" + "".join(f"{fmt_length(n):>13}" for n in lengths)]  # fmt: skip
    for task, res in tasks.items():
        row = {c["length"]: c for c in res["cells"]}
        lines.append(f"  {task:<6}{_fmt(res['chance_top1']):>7}" + "".join(f"{_entry(row[n]):>13}" for n in lengths))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _entry(cell: dict[str, Any]) -> str:
    return "skip" if "skipped" in cell else f"{cell['exact']:.2f} / {cell['rank_top1']:.2f}"


# ---------------------------------------------------------------------------------------------------------
# the commands


def register(subparsers: Any) -> None:
    """Add `niah` and `babilong` to the `nestlearn eval` subparsers."""
    p = subparsers.add_parser(
        "niah", help="needle-in-a-haystack recall over context lengths and depths (RULER-style)",
        description="Needle-in-a-haystack recall (RULER-style): greedy exact match and likelihood rank of the "
        "needle's value, per context length and needle depth; a table on stdout, JSON (--json) and a heatmap.",
    )  # fmt: skip
    _common(p, lengths="1K,2K,4K", samples=4, haystack="noise")
    p.add_argument("--tasks", default="single", help=f"comma list of {', '.join(niah.TASKS)} (default single)")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent (default 0,25,50,75,100)")
    p.add_argument("--needles", type=int, default=4, help="needles of multikey / multiquery / multivalue")
    p.add_argument("--kind", choices=niah.KINDS, default="number", help="the values' kind (default number)")
    p.add_argument("--candidates", type=int, default=10, help="values ranked per answer, the true one included")
    p.set_defaults(func=niah_command)
    b = subparsers.add_parser(
        "babilong", help="bAbI qa1-qa5 facts scattered through a book haystack (BABILong-style)",
        description="BABILong-style recall: bAbI qa1-qa5 stories whose facts are scattered through a haystack of "
        "each length, scored by greedy exact match and likelihood rank; a table on stdout, JSON (--json) and a "
        "heatmap.",
    )  # fmt: skip
    _common(b, lengths="0,1K,2K,4K", samples=10, haystack="austen")
    b.add_argument("--tasks", default=",".join(bl.TASKS), help="comma list of qa1..qa5 (default all)")
    b.add_argument("--facts", type=int, default=None, help="facts per story (default per task: qa1 6, ..., qa4 2)")
    b.set_defaults(func=babilong_command)


def _common(p: argparse.ArgumentParser, *, lengths: str, samples: int, haystack: str) -> None:
    from .command import add_run_arguments

    add_run_arguments(p)
    p.add_argument("--lengths", default=lengths, help=f"context lengths in tokens, K = 1,024 (default {lengths})")
    p.add_argument("--samples", type=int, default=samples, help=f"samples per cell (default {samples})")
    p.add_argument("--haystack", default=haystack, help=f"noise, file:PATH or a corpus name (default {haystack})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=2048, help="tokens per model call while streaming (default 2048)")
    p.add_argument("--png", default=None, help="heatmap path (default: the --json path with .png, if given)")


def niah_command(args: argparse.Namespace) -> None:
    """`nestlearn eval niah RUN ...`"""
    config = {"tasks": _names(args.tasks, niah.TASKS, "NIAH task"), "lengths": parse_lengths(args.lengths),
              "depths": parse_depths(args.depths), "samples": args.samples, "chunk": args.chunk,
              "needles": args.needles, "kind": args.kind, "candidates": args.candidates}  # fmt: skip
    loaded, hay = _load(args, config["lengths"], args.samples)
    results = run_niah(loaded.model, loaded.tokenizer, **config, haystack=hay, seed=args.seed, progress=_progress())
    _finish(args, "niah", {**config, "haystack": args.haystack}, results, loaded, plot_niah, niah_table(results))


def babilong_command(args: argparse.Namespace) -> None:
    """`nestlearn eval babilong RUN ...`"""
    config = {"tasks": _names(args.tasks, bl.TASKS, "bAbI task"), "lengths": parse_lengths(args.lengths),
              "samples": args.samples, "chunk": args.chunk, "facts": args.facts}  # fmt: skip
    loaded, hay = _load(args, config["lengths"], args.samples)
    results = run_babilong(loaded.model, loaded.tokenizer, **config, haystack=hay, seed=args.seed,
                           progress=_progress())  # fmt: skip
    _finish(args, "babilong", {**config, "haystack": args.haystack}, results, loaded, plot_babilong,
            babilong_table(results))  # fmt: skip


def _load(args: argparse.Namespace, lengths: list[int], samples: int) -> tuple[Any, Haystack]:
    """The run (`load.load_run`) and the haystack (read first: a bad name fails before the model loads); lengths
    the model cannot read are refused before anything is printed."""
    from ..train.loop import resolve_device
    from .load import load_run

    hay = niah.load_haystack(args.haystack)
    loaded = load_run(args.run, resolve_device(args.device), tokenizer=args.tokenizer)
    _check_grid(loaded.model, lengths, samples)
    _progress()(f"{loaded.checkpoint} (step {loaded.step}, {loaded.info.get('variant')}), haystack {hay.name}")
    return loaded, hay


def _finish(args: argparse.Namespace, kind: str, config: dict[str, Any], results: dict[str, Any], loaded: Any,
            plot: Callable[[dict[str, Any], Path], Path], text: str) -> None:  # fmt: skip
    """Print the table; write the report (--json) and the heatmap (--png, or beside the report)."""
    print(text)
    if args.json:
        from .report import write_report

        write_report(args.json, kind, config, results, loaded, seed=args.seed)
        _progress()(f"report written to {args.json}")
    png = args.png or (Path(args.json).with_suffix(".png") if args.json else None)
    if png:
        _progress()(f"heatmap written to {plot(results, Path(png))}")


def parse_lengths(text: str) -> list[int]:
    """Lengths from text: "0,1K,2K,128K,1000" -> [0, 1024, 2048, 131072, 1000] (K = 1,024)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)([kK]?)", part)
        if not m:
            raise ValueError(f"--lengths: {part!r} is not a token count; write e.g. 512,1K,4K,128K (K = 1,024)")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise ValueError("--lengths is empty; write e.g. 1K,2K,4K")
    return out


def parse_depths(text: str) -> list[float]:
    """Depths from text: "0,25,50,75,100" (percent) -> [0.0, 0.25, 0.5, 0.75, 1.0]."""
    try:
        out = [float(p) / 100 for p in text.split(",") if p.strip()]
    except ValueError:
        out = []
    if not out or any(not 0 <= d <= 1 for d in out):
        raise ValueError(f"--depths: {text!r} is not a list of percentages in 0..100; write e.g. 0,25,50,75,100")
    return out


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in allowed]
    if bad or not names:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    return names


def _progress() -> Progress:
    """The suite's progress printer (`report.progress`: a timed line on stderr)."""
    from .report import progress

    return progress
