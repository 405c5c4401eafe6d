"""Running parity with and without HOPE's inner step-size cap: does a tiny HOPE learn it at training length 64,
and does what it learned carry to length 256?

What this is: for each cap setting and each seed, the `tiny` HOPE of `nestlearn synth` (width 64, 2 blocks,
4 heads, memory chunks of 16, a CMS level learning online every 16 tokens: `nestlearn.eval.synth.run.SMALL`)
trained on running parity (`parity`: the parity of the 1s read so far, at every position of uniform random bits,
every length 1 .. `--train-len`) by the library's own trainer (`nestlearn.eval.synth.run.train`: AdamW, warm-up
then cosine, gradient clip 1), then scored by the library's `evaluate` at exactly `--train-len` and
`--test-len` tokens (token accuracy and sequence accuracy: every position of a string right). Two more numbers
at the test length, with the library's `score`: the token accuracy of the positions beyond the training length
only (the first `--train-len` positions are in distribution) and of the last position (the parity-check
answer). The step sizes the trained models actually use are recorded too (the eta gate every self-modifying
layer's memories share, while reading the test strings: mean, largest, and the fraction above the cap `1 / C`).

The two settings (`ModelConfig.eta_cap`, docs/decisions.md C1 and departure 1): `cap` (the default) keeps every
eta gate in [0, 1 / C] (C = 16 here); `nocap` is the paper's gate, `sigmoid(.)` in [0, 1], whose bias is set so
that eta starts at the same value (0.1 / C): both start as the same model and only what training may reach
differs. Why it might matter (a reason to measure, not a result): a DGD step multiplies the memory by
`alpha I - eta x̂ x̂^T`, whose eigenvalue along x̂ is `alpha - eta`; with eta <= 1 / C it stays positive, while an
uncapped eta > alpha makes it negative, the sign flip that lets a linear recurrence track parity (Grazzi et al.,
"Unlocking state-tracking in linear RNNs through negative eigenvalues", 2025).

Time: `--budget-minutes` (5.5 by default; 0 turns it off) bounds the whole call. Before the runs, a calibration
times training steps at four lengths spread over the training bin and one evaluation batch at the test length
(after a warm-up step), and if `--steps` would not fit every run into the budget, every run gets the same smaller
number of steps (the table and the JSON say so). The defaults (3 seeds x 2 settings, 600 steps of 64 rows, 4
evaluation batches per length) were chosen from CPU timings: on the 2-core CPU a training step of 64 rows takes
0.34 s at length 16 and 2.1 s at length 64 and dispatches about 2,600 and 14,000 top-level operators (forward,
backward, AdamW); shapes this small are bound by operator dispatch on a GPU, at roughly 10 us an operator,
hence about 0.03-0.15 s a step and 0.5 s an evaluation batch of length 256 there: about 4-5 minutes for the six
runs (an estimate; the calibration decides). The JSON (`--out`) is rewritten after every run, so an
interrupted call keeps the finished runs. Progress goes to stderr, the table to stdout.

    python -m benchmarks.parity_cap --device cuda --out parity_cap.json
    python -m benchmarks.parity_cap --device cuda --seeds 0,1,2 --steps 800 --batch 64 --out parity_cap.json
    python -m benchmarks.parity_cap --smoke --out /tmp/parity_smoke.json      # CPU, seconds: the code path only

`--smoke` runs every part on toy settings (lengths 8 and 16, one seed, 2 steps of 4 rows) and says nothing
about parity. `--model KEY=VALUE` changes a ModelConfig field of both settings (e.g. `mem_chunk=8`). Set
`NESTLEARN_COMMIT` to record the commit in the JSON.
What it is not: a result (docs/results holds none for it yet), or a tuned setting for parity.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import run_meta, sync
from nestlearn.eval.report import jsonable
from nestlearn.eval.synth import make_task
from nestlearn.eval.synth.run import EVAL_SEED_OFFSET, Settings, build_model, evaluate, model_config, score
from nestlearn.eval.synth.run import train as train_model
from nestlearn.eval.synth.tasks import Batch, Task
from nestlearn.models import next_token_loss

ARMS = {"cap": True, "nocap": False}  # setting name -> ModelConfig.eta_cap
LEARNED = 0.99  # a run "learned" parity at a length when its sequence accuracy there is at least this
CALIBRATION_LENGTHS = 4  # training lengths timed by the calibration, spread over the training bin
BUDGET_SHARE = 0.9  # of the time left after the calibration, planned for the runs (the rest: estimation error)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu (or --smoke)")
    start = time.perf_counter()
    task = OnDevice(make_task("parity", seq_len=args.train_len), device)
    arms = [a.strip() for a in args.arms.split(",")]
    runs = [(arm, seed) for arm in arms for seed in args.seeds]
    overrides = dict(args.model)
    configs = {arm: model_config(task, "hope", "tiny", {**overrides, "eta_cap": ARMS[arm]}) for arm in arms}
    steps, calibration = plan_steps(args, task, configs[arms[0]], len(runs), device, start)
    meta = run_meta(device.type, benchmark="parity_cap", argv=sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "meta": meta,
        "settings": {**{k: v for k, v in vars(args).items() if k != "model"}, "model": overrides,
                     "steps_run": steps, "learned_threshold": LEARNED},
        "calibration": calibration,
        "model_configs": {arm: cfg.to_dict() for arm, cfg in configs.items()},
        "runs": [],
    }  # fmt: skip
    for i, (arm, seed) in enumerate(runs, start=1):
        progress(f"run {i}/{len(runs)}: {arm}, seed {seed}, {steps} steps", start)
        record = one_run(task, configs[arm], arm, seed, steps, args, start)
        report["runs"].append(record)
        report["summary"] = summarise(report["runs"], arms)
        report["seconds"] = time.perf_counter() - start
        write(args.out, report)
    print(table(report, args))
    return report


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.parity_cap", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", required=True, help="the JSON report (rewritten after every run)")
    p.add_argument("--seeds", type=seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--arms", default="cap,nocap", help="settings to run: cap, nocap or both (default)")
    p.add_argument("--steps", type=int, default=600, help="training steps per run, if the budget allows (600)")
    p.add_argument("--batch", type=int, default=64, help="rows per step and per evaluation batch (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (default 3e-3)")
    p.add_argument("--train-len", type=int, default=64, help="longest training length (default 64)")
    p.add_argument("--test-len", type=int, default=256, help="evaluation length beyond it (default 256)")
    p.add_argument("--eval-batches", type=int, default=4, help="evaluation batches per length (default 4)")
    p.add_argument("--budget-minutes", type=float, default=5.5, help="bound on the whole call; 0: none (5.5)")
    p.add_argument("--model", action="append", default=[], type=pair, metavar="KEY=VALUE",
                   help="a ModelConfig field for both settings, e.g. mem_chunk=8")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="toy settings on the CPU: checks the code path in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        given = sys.argv[1:] if argv is None else argv
        args.device = args.device if "--device" in given else "cpu"
        args.seeds, args.steps, args.batch, args.eval_batches = [0], 2, 4, 1
        args.train_len, args.test_len = 8, 16
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    bad = [a for a in args.arms.split(",") if a.strip() not in ARMS]
    if bad:
        p.error(f"--arms: unknown setting(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    if args.test_len <= args.train_len:
        p.error(f"--test-len ({args.test_len}) must exceed --train-len ({args.train_len})")
    for name in ("steps", "batch", "eval_batches", "train_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


class OnDevice:
    """The task with every batch moved to `device` (the library's trainer and scorer sample on the CPU with a
    CPU generator and hand the batch to the model as it is); everything else is the task's own."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task, self.device = task, device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def sample(self, batch: int, length: int, gen: torch.Generator) -> Batch:
        return Batch(*(t.to(self.device) for t in self.task.sample(batch, length, gen)))


# ---------------------------------------------------------------------------------------------
# time


def plan_steps(
    args: argparse.Namespace, task: OnDevice, config: Any, runs: int, device: torch.device, start: float
) -> tuple[int, dict[str, Any]]:
    """The steps every run takes: `args.steps`, or fewer when the calibration says they would not fit the budget."""
    if not args.budget_minutes:
        return args.steps, {"skipped": True}
    model = build_model(task, config, 0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    lo, hi = task.train_bin()
    lengths = sorted({round(lo + (hi - lo) * (i + 0.5) / CALIBRATION_LENGTHS) for i in range(CALIBRATION_LENGTHS)})

    def step(length: int) -> float:
        b = task.sample(args.batch, length, gen)
        sync(device)
        t0 = time.perf_counter()
        loss = next_token_loss(model(b.inputs), b.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        return time.perf_counter() - t0

    def read(length: int) -> float:
        b = task.sample(args.batch, length, gen)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(b.inputs).argmax(-1)
        sync(device)
        return time.perf_counter() - t0

    step(hi), read(args.test_len)  # warm-up (kernels, allocator)
    step_s = statistics.mean(step(n) for n in lengths)
    read_s = read(args.train_len) + read(args.test_len)
    # per run: the steps, the library's evaluation (both lengths) and the extra pass at the test length
    eval_s = args.eval_batches * (read_s + read(args.test_len))
    left = BUDGET_SHARE * (args.budget_minutes * 60 - (time.perf_counter() - start))
    fit = math.floor((left / runs - eval_s - 1.0) / step_s)  # 1 s per run for building the model and writing
    steps = max(1, min(args.steps, fit))
    cal = {"step_seconds": step_s, "eval_seconds_per_run": eval_s, "lengths": lengths, "fits": fit,
           "budget_minutes": args.budget_minutes, "capped_by_budget": steps < args.steps}  # fmt: skip
    progress(f"calibration: {step_s * 1e3:.0f} ms a step (lengths {lengths}), {eval_s:.1f} s of evaluation a run; "
             f"{runs} runs x {steps} steps" + (f" (budget: {args.steps} requested)" if steps < args.steps else ""),
             start)  # fmt: skip
    return steps, cal


# ---------------------------------------------------------------------------------------------
# one run


def one_run(
    task: OnDevice, config: Any, arm: str, seed: int, steps: int, args: argparse.Namespace, start: float
) -> dict[str, Any]:
    s = Settings(steps=steps, batch=args.batch, lr=args.lr, seed=seed, eval_batches=args.eval_batches)
    model = build_model(task, config, seed).to(task.device)
    head = {"arm": arm, "eta_cap": ARMS[arm], "seed": seed, "steps": steps}
    try:
        trained = train_model(model, task, s)
    except RuntimeError as e:  # the trainer stops at the first non-finite loss; the run counts as diverged
        if not str(e).startswith("training diverged"):
            raise
        progress(f"{arm}, seed {seed}: {e}", start)
        return {**head, "diverged": str(e)}
    bins = [(args.train_len, args.train_len), (args.test_len, args.test_len)]
    t0 = time.perf_counter()
    per_bin = evaluate(model, task, bins, s.eval_batches, s.batch, seed)
    beyond = extra_scores(model, task, args, seed)
    losses = trained["losses"]
    return {
        **head, "diverged": None, "train_seconds": trained["seconds"], "eval_seconds": time.perf_counter() - t0,
        "final_loss": trained["final_loss"], "first_loss": losses[0],
        "losses_every_10": losses[::10],
        "train_len": {k: per_bin[0][k] for k in ("token_accuracy", "sequence_accuracy")},
        "test_len": {**{k: per_bin[1][k] for k in ("token_accuracy", "sequence_accuracy")}, **beyond["scores"]},
        "eta": beyond["eta"], "bins": per_bin,
    }  # fmt: skip


@torch.no_grad()  # not inference_mode: the online CMS level keeps learning while it reads (it needs autograd)
def extra_scores(model: Any, task: OnDevice, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """At the test length: token accuracy beyond the training length and at the last position (the library's
    `score` on masks of those positions), and the eta gates of every self-modifying layer."""
    gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET + 1)  # not the library evaluation's strings
    model.eval()
    etas: list[torch.Tensor] = []
    layers = [b.mixers[0] for b in model.lm.blocks]
    originals = [layer.op for layer in layers]
    for layer, op in zip(layers, originals, strict=True):
        layer.op = recording(op, etas)
    beyond = last = (0, 0)
    try:
        for _ in range(args.eval_batches):
            b = task.sample(args.batch, args.test_len, gen)
            pred = model(b.inputs).argmax(-1)
            past = torch.zeros_like(b.mask)
            past[:, args.train_len :] = True
            end = torch.zeros_like(b.mask)
            end[:, -1] = True
            s1, s2 = score(pred, b._replace(mask=b.mask & past)), score(pred, b._replace(mask=b.mask & end))
            beyond, last = (beyond[0] + s1.right, beyond[1] + s1.tokens), (last[0] + s2.right, last[1] + s2.tokens)
    finally:
        for layer, op in zip(layers, originals, strict=True):
            layer.op = op
    eta = torch.cat([e.flatten() for e in etas]).float()
    finite = eta[eta.isfinite()]  # a model whose state blows up past the training length reads NaN gates there
    cap = 1.0 / max(model.lm.config.mem_chunk, model.lm.config.proj_chunk)
    return {
        "scores": {"beyond_train_token_accuracy": beyond[0] / beyond[1], "last_token_accuracy": last[0] / last[1]},
        "eta": {"mean": float(finite.mean()) if finite.numel() else None,
                "max": float(finite.max()) if finite.numel() else None, "cap": cap,
                "fraction_above_cap": float((finite > cap * (1 + 1e-6)).float().mean()) if finite.numel() else None,
                "fraction_not_finite": 1.0 - finite.numel() / max(eta.numel(), 1)},
    }  # fmt: skip


def _num(x: float | None, width: int, digits: int) -> str:
    return f"{x:{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def recording(op: Any, etas: list[torch.Tensor]) -> Any:
    """The memory op, noting its eta argument (q, k, v, eta, ...)."""

    def call(*a: Any, **kw: Any) -> Any:
        etas.append(a[3].detach())
        return op(*a, **kw)

    return call


# ---------------------------------------------------------------------------------------------
# output


def summarise(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per setting: runs, diverged runs, seeds that learned parity at each length, and the mean / min / max of each
    number over the runs that finished (None when none did)."""
    out = {}
    for arm in arms:
        rs = [r for r in records if r["arm"] == arm]
        ok = [r for r in rs if not r["diverged"]]
        if not rs:
            continue

        def stats(get: Any, ok: list[dict[str, Any]] = ok) -> dict[str, float] | None:
            xs = [get(r) for r in ok]
            return {"mean": statistics.mean(xs), "min": min(xs), "max": max(xs)} if xs else None

        out[arm] = {
            "runs": len(rs),
            "diverged": len(rs) - len(ok),
            "learned_at_train_len": sum(r["train_len"]["sequence_accuracy"] >= LEARNED for r in ok),
            "learned_at_test_len": sum(r["test_len"]["sequence_accuracy"] >= LEARNED for r in ok),
            "train_len_seq_acc": stats(lambda r: r["train_len"]["sequence_accuracy"]),
            "train_len_token_acc": stats(lambda r: r["train_len"]["token_accuracy"]),
            "test_len_seq_acc": stats(lambda r: r["test_len"]["sequence_accuracy"]),
            "test_len_beyond_token_acc": stats(lambda r: r["test_len"]["beyond_train_token_accuracy"]),
            "test_len_last_token_acc": stats(lambda r: r["test_len"]["last_token_accuracy"]),
            "final_loss": stats(lambda r: r["final_loss"]),
            "eta_max": stats(lambda r: r["eta"]["max"]),
        }
    return out


def table(report: dict[str, Any], args: argparse.Namespace) -> str:
    n, m = args.train_len, args.test_len
    lines = [
        f"running parity, tiny HOPE, trained on lengths 1-{n} ({report['settings']['steps_run']} steps of "
        f"{args.batch} rows, lr {args.lr}), scored at {n} and {m}; {report['meta']['device']}, "
        f"{report['seconds']:.0f} s",
        f"{'setting':>7} {'seed':>4} {'loss':>6} | {'tok@' + str(n):>7} {'seq@' + str(n):>7} | {'tok>' + str(n):>7} "
        f"{'last@' + str(m):>8} {'seq@' + str(m):>7} | {'eta max':>7} {'>cap':>5} {'NaN':>5}",
    ]  # fmt: skip
    for r in report["runs"]:
        if r["diverged"]:
            lines.append(f"{r['arm']:>7} {r['seed']:>4} {r['diverged']}")
            continue
        a, b, e = r["train_len"], r["test_len"], r["eta"]
        lines.append(
            f"{r['arm']:>7} {r['seed']:>4} {r['final_loss']:6.3f} | {a['token_accuracy']:7.3f} "
            f"{a['sequence_accuracy']:7.3f} | {b['beyond_train_token_accuracy']:7.3f} {b['last_token_accuracy']:8.3f} "
            f"{b['sequence_accuracy']:7.3f} | {_num(e['max'], 7, 4)} {_num(e['fraction_above_cap'], 5, 2)} "
            f"{e['fraction_not_finite']:5.2f}"
        )  # fmt: skip
    for arm, s in report["summary"].items():
        done = s["runs"] - s["diverged"]
        line = (f"{arm}: {done}/{s['runs']} runs finished; learned (seq acc >= {LEARNED}) at {n} in "
                f"{s['learned_at_train_len']}, at {m} in {s['learned_at_test_len']}")  # fmt: skip
        if done:
            seq_n, seq_m = s["train_len_seq_acc"]["mean"], s["test_len_seq_acc"]["mean"]
            beyond = s["test_len_beyond_token_acc"]["mean"]
            line += f"; mean seq acc {seq_n:.3f} at {n}, {seq_m:.3f} at {m}; token acc beyond {n} {beyond:.3f}"
        lines.append(line)
    if report["calibration"].get("capped_by_budget"):
        lines.append(f"steps lowered from {args.steps} to fit --budget-minutes {args.budget_minutes}")
    return "\n".join(lines)


def write(path: str, report: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(report), indent=1) + "\n")
    tmp.replace(out)


def progress(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
