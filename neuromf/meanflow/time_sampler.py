"""(t, r) pairs for the iMF loss (docs/design.md, 'Time sampling').

Two independent logit-normal times per sample, clamped below at t_min; t is the larger, r the
smaller. The FIRST floor(B * data_proportion) samples get r = t (a fixed block, not a coin
per sample), so the JVP only ever needs the contiguous r != t slice [n_fm:], whose size is a
Python int known before any data is seen (static shapes for torch.compile).
"""

from __future__ import annotations

import math

import torch

from neuromf.spec.schema import TimeSamplingSpec

__all__ = ["num_flow_matching", "sample_time_pairs"]


def num_flow_matching(batch: int, data_proportion: float) -> int:
    """Size of the leading r = t block: floor(batch * data_proportion).

    A tiny epsilon keeps products such as 100 * 0.29 = 28.999999999999996 at their intended 29.
    """
    return min(batch, int(math.floor(batch * data_proportion + 1e-9)))


def sample_time_pairs(
    batch: int,
    spec: TimeSamplingSpec,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, r), each float32 of shape (batch,), with t >= r >= spec.t_min and r = t on the first block.

    All randomness comes from `generator` (drawn on the generator's device, then moved to
    `device`), so a step is reproducible from the generator's state alone.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if spec.distribution != "logit_normal":
        raise ValueError(f"unsupported time distribution {spec.distribution!r}")
    normal = torch.randn((2, batch), generator=generator, device=generator.device, dtype=torch.float32)
    ab = torch.sigmoid(normal * spec.sigma + spec.mu).clamp(min=spec.t_min)
    t = ab.max(dim=0).values
    r = ab.min(dim=0).values
    n_fm = num_flow_matching(batch, spec.data_proportion)
    r = torch.cat([t[:n_fm], r[n_fm:]])
    target = torch.device(device) if device is not None else generator.device
    return t.to(target), r.to(target)
