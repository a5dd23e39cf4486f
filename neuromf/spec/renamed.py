"""Run-spec keys that were renamed, and what happens to the old names.

A run-spec (or `--set`) that still uses an old name is refused with one line naming the new key, so nobody
trains with a value that is silently ignored. A checkpoint keeps the run-spec it was trained with: its old
names are read as the new ones, so older runs still resume, sample and evaluate.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["RENAMED", "new_name", "upgrade_saved_config"]

# (section, old key) -> new key in the same section
RENAMED: dict[tuple[str, str], str] = {
    ("meanflow", "t_min"): "denominator_floor",  # the floor of max(t, .) in u, not a time drawn (time_sampling.t_min)
}


def new_name(loc: tuple[Any, ...]) -> str | None:
    """'section.new_key' when `loc` is a renamed key of a run-spec, else None."""
    if len(loc) == 2 and (loc[0], loc[1]) in RENAMED:
        return f"{loc[0]}.{RENAMED[(loc[0], loc[1])]}"
    return None


def upgrade_saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved run-spec with old key names replaced by the new ones (a copy; the input is left alone)."""
    config = copy.deepcopy(config)
    for (section, old), new in RENAMED.items():
        part = config.get(section)
        if isinstance(part, dict) and old in part and new not in part:
            part[new] = part.pop(old)
    return config
