"""Experiments with nestlearn, run from the repository root as modules: `python -m scripts.optim_toy --help`.

Not part of the installed library (pyproject.toml ships `nestlearn` only).
"""
