"""Benchmarks of nestlearn, run from the repository root as modules: `python -m benchmarks.models --help`.

Not part of the installed library (pyproject.toml ships `nestlearn` only).
"""
