"""The README's example runs and shows what it claims: after reading a document, a later call from the saved
state alone (context forgotten) predicts the document's fact better than before and better than a wrong
answer of the same length."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_learn_a_fact() -> None:
    spec = importlib.util.spec_from_file_location("learn_a_fact", EXAMPLES / "learn_a_fact.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.run()
    (right0, wrong0, _), (right1, wrong1, _) = out["before"], out["after"]
    assert abs(right0 - wrong0) < 0.5  # before: no preference
    assert right1 < right0 - 2 and right1 < wrong1 - 1  # measured: 6.447 -> 2.826, wrong answer 4.559
