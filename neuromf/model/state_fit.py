"""Loading a state dict into a network, or one line that says why it does not fit.

The one report for every file of weights the project loads (a checkpoint's online and EMA weights, the
MAISI VAE, the NV-Generate-MR backbone of a warm start, the FID extractors): the missing, unexpected and
wrongly shaped keys, a few of each by name, in one UserError line that names the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from neuromf.errors import UserError

__all__ = ["load_fitting"]

SHOWN = 8  # keys named per kind before "and N more"


def _listed(keys: list[str]) -> str:
    more = len(keys) - SHOWN
    return ", ".join(keys[:SHOWN]) + (f", and {more} more" if more > 0 else "")


def _count(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"


def _mismatch(expected: Mapping[str, Any], state: Mapping[str, Any], *, allow_missing: bool = False) -> str:
    """'' when `state` fits `expected` (a network's state dict); else 'missing 2 keys (a, b); unexpected 1 key (c); ...'.

    With allow_missing, keys of `expected` absent from `state` are fine (they keep the network's values).
    """
    missing = [] if allow_missing else sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    parts = [f"missing {_count(len(missing))} ({_listed(missing)})"] if missing else []
    parts += [f"unexpected {_count(len(unexpected))} ({_listed(unexpected)})"] if unexpected else []
    parts += [f"{_count(len(wrong))} of the wrong shape, file vs network ({_listed(wrong)})"] if wrong else []
    return "; ".join(parts)


def load_fitting(
    net: nn.Module, state: Mapping[str, Any], source: str, target: str, *, hint: str = "", allow_missing: bool = False
) -> None:
    """Load `state` into `net` (strict unless allow_missing), or raise one UserError line:
    '<source> does not fit <target>: missing ...; unexpected ...; ... of the wrong shape ...[; <hint>]'."""
    problem = _mismatch(net.state_dict(), state, allow_missing=allow_missing)
    if problem:
        raise UserError(f"{source} does not fit {target}: {problem}" + (f"; {hint}" if hint else ""))
    net.load_state_dict(state, strict=not allow_missing)
