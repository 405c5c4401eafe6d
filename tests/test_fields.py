"""Config values are converted to their field's annotated type (nestlearn/fields.py), or named when they cannot be."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from nestlearn.fields import coerce, describe


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        ("3e-3", float, 3e-3),
        (3, float, 3.0),
        ("1e3", int, 1000),
        (1000.0, int, 1000),
        ("true", bool, True),
        ("off", bool, False),
        (2024, str, "2024"),
        ("null", float | None, None),
        (None, int | None, None),
        ("2", int | None, 2),
        ("1e-3", float | tuple[float, ...], 1e-3),
        ([0, "1e-3"], float | tuple[float, ...], (0.0, 1e-3)),
        ([None, "64"], tuple[int | None, ...], (None, 64)),
        ("lr, steps", tuple[str, ...], ("lr", "steps")),
        (["factor", "8"], tuple[str, float], ("factor", 8.0)),
        ("wsd", Literal["cosine", "wsd"], "wsd"),
        ({"a": 1}, dict[str, Any], {"a": 1}),
    ],
)
def test_values_take_their_field_type(value, annotation, expected) -> None:
    got = coerce(value, annotation, "x")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        ("abc", float, "x: expected a number, got 'abc'"),
        (True, float, "x: expected a number, got True"),
        (2.5, int, "x: expected an integer, got 2.5"),
        ("maybe", bool, "x: expected true or false, got 'maybe'"),
        ("linear", Literal["cosine", "wsd"], "x: expected one of 'cosine', 'wsd', got 'linear'"),
        ("x", tuple[int, ...], "x: expected a list, each an integer, got 'x'"),
        ([1, 2, 3], tuple[str, float], "x: expected a list of a string, a number, got"),
        ("nan?", float | None, "x: expected a number or null"),
    ],
)
def test_values_that_do_not_fit_are_named(value, annotation, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        coerce(value, annotation, "x")


def test_descriptions_are_readable() -> None:
    assert describe(int | None) == "an integer or null"
