"""Typed values for the dataclass configs: a value is converted to its field's annotated type wherever it came from.

What this is: `coerce(value, annotation, name)` and `coerce_fields(instance)`. YAML reads `3e-3` as the string
'3e-3' (an exponent without a decimal point is not a float in YAML 1.1), a command line gives strings, JSON gives
lists where the configs hold tuples; every config runs its fields through here in `__post_init__`, so `lr` is a
float whether it came from Python, YAML, JSON or `lr=3e-3`. A value that does not fit is a `ValueError` that names
the field, the expected type (or the valid choices) and the value. What it is not: range checks (each config
checks its own ranges) or a general-purpose type system: only the annotations the configs use are supported
(bool, int, float, str, None, Literal, unions, `tuple[X, ...]`, `dict[str, Any]`, `Any`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce_fields(instance: Any) -> None:
    """Convert every field of a dataclass instance to its annotated type in place (frozen dataclasses too)."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        new = coerce(value, hints[f.name], f.name)
        if new is not value:
            object.__setattr__(instance, f.name, new)


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """`value` as `annotation`; ValueError naming `name` when it cannot be."""
    try:
        return _convert(value, annotation)
    except _Mismatch:
        raise ValueError(f"{name}: expected {describe(annotation)}, got {value!r}") from None


def describe(annotation: Any) -> str:
    """A readable name of a type annotation ('a number', 'one of 'a', 'b'', 'a list of ...')."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return "any value"
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list, each {describe(args[0])}"
    if origin is tuple:
        return "a list of " + ", ".join(describe(a) for a in args)
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


class _Mismatch(Exception):
    pass


def _convert(value: Any, annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        raise _Mismatch
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        return _union(value, args)
    if origin is tuple:
        return _tuple(value, args)
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    scalar = {bool: _bool, int: _int, float: _float, str: _str}.get(annotation)
    if scalar is None:
        return value  # an annotation the configs do not constrain
    return scalar(value)


def _union(value: Any, args: tuple[Any, ...]) -> Any:
    # None first (so 'null' is None, not the string 'null'), then exact types, then conversions in order
    ordered = sorted(args, key=lambda a: a is not type(None))
    for a in ordered:
        if a in (bool, int, float, str) and type(value) is a:
            return value
    for a in ordered:
        try:
            return _convert(value, a)
        except _Mismatch:
            continue
    raise _Mismatch


def _tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if isinstance(value, str) and args[0] is str:
        value = [v.strip() for v in value.split(",") if v.strip()]  # `allow_changes=lr,steps`
    if not isinstance(value, list | tuple):
        raise _Mismatch
    if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length, every item an X
        out = tuple(_convert(v, args[0]) for v in value)
    elif len(args) == len(value):  # tuple[X, Y]: item by item
        out = tuple(_convert(v, a) for v, a in zip(value, args, strict=True))
    else:
        raise _Mismatch
    return value if isinstance(value, tuple) and all(a is b for a, b in zip(out, value, strict=True)) else out


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Mismatch


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = _float(value)  # '1e3'
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    raise _Mismatch


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # `model=125M` is a string, `out=2024` a directory name
    raise _Mismatch
