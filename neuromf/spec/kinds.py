"""Kinds of run-spec values that pydantic's lax mode would silently convert: booleans vs numbers, seed ranges."""

from __future__ import annotations

import typing
from typing import Any

SEED_LIMIT = 2**32  # numpy and every torch generator accept seeds in [0, 2^32)


def takes(annotation: Any, kind: type) -> bool:
    """Does a field annotation accept `kind` (int, bool) directly or inside Optional/list/tuple?"""
    if annotation is kind:
        return True
    return any(takes(a, kind) for a in typing.get_args(annotation) if a is not Ellipsis)


def type_problem(name: str, annotation: Any, value: Any) -> str | None:
    """YAML `true` is not 1 and `1` is not true: booleans and integers never stand in for each other."""
    values = value if isinstance(value, (list, tuple)) else [value]
    number = takes(annotation, int) or takes(annotation, float)
    if number and not takes(annotation, bool) and any(isinstance(v, bool) for v in values):
        return f"{name}: expected a number, got a boolean ({value!r})"
    if (
        takes(annotation, bool)
        and not takes(annotation, int)
        and any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        return f"{name}: expected true or false, got {value!r}"
    if (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and not 0 <= value < SEED_LIMIT:
        return f"{name}: {value} is outside [0, 2^32)"
    return None
