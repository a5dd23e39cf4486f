"""JSON for reports: non-finite floats become null (JSON has no NaN), numpy scalars become Python numbers."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["clean", "to_json"]


def clean(value: Any) -> Any:
    """A copy of `value` that json.dumps accepts with allow_nan=False."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def to_json(value: Any) -> str:
    return json.dumps(clean(value), indent=1, allow_nan=False) + "\n"
