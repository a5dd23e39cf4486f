"""Seeds derived from names: independent random streams for the data order, the loss noise, samples and the split.

Each stream is seeded by a hash of what identifies it (e.g. ("loss", seed, step, chunk)),
not by consecutive integers, so two streams never overlap and a stream depends on nothing
but its own parts: a resumed run, another number of processes or another machine draws
the same numbers. The parts are joined with ":" and hashed with SHA-256; the first 8 bytes
of the digest give the value. Changing any of this changes every data order, split and
sample of existing runs.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derived_fraction", "derived_generator", "derived_seed"]


def _digest8(parts: tuple[object, ...]) -> bytes:
    return hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8]


def derived_seed(*parts: object) -> int:
    """A 63-bit seed (a valid torch seed) from `parts`."""
    return int.from_bytes(_digest8(parts), "little") >> 1


def derived_generator(device: torch.device, *parts: object) -> torch.Generator:
    """A generator on `device` seeded by `derived_seed(*parts)`."""
    return torch.Generator(device).manual_seed(derived_seed(*parts))


def derived_fraction(*parts: object) -> float:
    """A number in [0, 1) from `parts` (the digest's first 8 bytes, big-endian, / 2**64)."""
    return int.from_bytes(_digest8(parts), "big") / 2.0**64
