"""The paper's Fig. 4 comparison on its 2-D toy `psi(r, theta) = r^2 + k (r - theta + a sin(w r))^2` from
(-3.5, 2): momentum against delta momentum at the same rate and momentum factor, with the other deep
optimizers beside them. Prints a table (final psi, steps until psi < 0.1), a grid of momentum against delta momentum
over rates, momentum factors and zeta, and writes the trajectories over the contours of psi to a PNG.

    python -m scripts.optim_toy --out docs/results/optimizers_toy.png
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from nestlearn.optim import M3, AssociativeAdam, DeepMomentum, DeltaMomentum, Muon, PreconditionedMomentum
from nestlearn.optim.toy import START, psi, run_toy

LR, MU = 0.01, 0.95
RUNS = {
    "momentum (Eq. 33)": lambda ps: PreconditionedMomentum(ps, lr=LR, momentum=MU),
    "delta momentum (Eq. 49)": lambda ps: DeltaMomentum(ps, lr=LR, momentum=MU, zeta=0.05),
    "delta momentum, as printed": lambda ps: DeltaMomentum(ps, lr=LR, momentum=MU, zeta=1.0, normalize=False),
    "DMGD, MLP memory (Eq. 50)": lambda ps: DeepMomentum(ps, lr=LR, momentum=MU, inner_lr=0.01),
    "Muon (Eq. 52)": lambda ps: Muon(ps, lr=0.02, weight_decay=0.0),
    "M3 (Alg. 1, stable)": lambda ps: M3(ps, lr=0.5, frequency=5),
    "Adam as memory (App. B)": lambda ps: AssociativeAdam(ps, lr=0.05, weight_decay=0.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=None, help="PNG path for the trajectories")
    args = p.parse_args()
    paths = {name: run_toy(make, args.steps) for name, make in RUNS.items()}
    print(f"psi at the start {float(psi(torch.tensor(START, dtype=torch.float64))):.2f}; {args.steps} steps")
    print(f"{'optimizer':30s} {'final psi':>12s} {'steps to psi < 0.1':>19s}")
    for name, path in paths.items():
        print(f"{name:30s} {float(psi(path[-1])):12.4g} {steps_to(path):>19s}")
    grid(args.steps)
    if args.out:
        plot(paths, Path(args.out))


def steps_to(path: torch.Tensor, level: float = 0.1) -> str:
    below = (psi(path) < level).nonzero()
    return str(int(below[0])) if len(below) else "never"


def grid(steps: int) -> None:
    """Steps until psi < 0.1: momentum against delta momentum (zeta 0.05 / 0.2 / 0.5) at the same lr and mu."""
    print(f"\n{'mu':>5s} {'lr':>6s} {'momentum':>9s} {'delta .05':>10s} {'delta .2':>9s} {'delta .5':>9s}")
    for mu in (0.9, 0.95):
        for lr in (0.003, 0.01, 0.02):
            row = [steps_to(run_toy(partial(PreconditionedMomentum, lr=lr, momentum=mu), steps))]
            for z in (0.05, 0.2, 0.5):
                row.append(steps_to(run_toy(partial(DeltaMomentum, lr=lr, momentum=mu, zeta=z), steps)))
            print(f"{mu:5.2f} {lr:6.3f} {row[0]:>9s} {row[1]:>10s} {row[2]:>9s} {row[3]:>9s}")


def plot(paths: dict[str, torch.Tensor], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, t = torch.meshgrid(torch.linspace(-4.5, 2, 300), torch.linspace(-4, 3, 300), indexing="ij")
    z = psi(torch.stack([r, t], -1).double())
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.contour(r.numpy(), t.numpy(), z.log1p().numpy(), levels=25, cmap="Greys", linewidths=0.6)
    for name, path in paths.items():
        ok = torch.isfinite(path).all(1) & (path.abs() < 10).all(1)  # a diverging run leaves the frame
        label = name if bool(ok.all()) else f"{name} (diverges)"
        ax.plot(path[ok, 0].numpy(), path[ok, 1].numpy(), lw=1.3, label=label)
    ax.set(xlim=(-4.5, 2), ylim=(-4, 3))
    ax.plot(*START, "ko")
    ax.plot(0, 0, "k*", ms=12)
    ax.set(xlabel="r", ylabel="theta", title="psi(r, theta) = r^2 + 5 (r - theta + sin 3r)^2, from (-3.5, 2)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
