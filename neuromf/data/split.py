"""Deterministic train/val split of latent names.

Each name's place is set by a hash of (seed, name), not by a random stream over
a listing: the same name lands in the same split on every machine, whatever
order the file system lists files in.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """(n_train, n_val): round(n * val_fraction) held out, at least one when asked for and possible."""
    if val_fraction <= 0 or n < 2:
        return n, 0
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return n - n_val, n_val


def _rank(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_names(names: Sequence[str], val_fraction: float, seed: int = 42) -> tuple[list[str], list[str]]:
    """(train, val) names, each sorted. Disjoint, complete, independent of the input order."""
    if len(set(names)) != len(names):
        raise ValueError("latent names must be unique")
    _, n_val = split_sizes(len(names), val_fraction)
    ranked = sorted(sorted(names), key=lambda name: _rank(name, seed))
    val = set(ranked[:n_val])
    return sorted(n for n in names if n not in val), sorted(val)
