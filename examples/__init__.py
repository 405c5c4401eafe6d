"""Examples of nestlearn, run from the repository root as modules: `python -m examples.learn_a_fact`.

Not part of the installed library (pyproject.toml ships `nestlearn` only).
"""
