"""Generating many samples in batches from fixed, per-sample noise.

Sample i's noise depends only on (seed, i): `--n 4` gives the first four
samples of `--n 100`, on any device and with any batch size, and the EMA and
online weights (and every NFE) start from the same noise, so they are compared
draw for draw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from neuromf.seeding import derived_seed
from neuromf.spec.schema import RunSpec

__all__ = ["sample_noise", "generate_batches"]


def sample_noise(seed: int, start: int, count: int, shape: Sequence[int]) -> torch.Tensor:
    """Noise for samples start .. start + count - 1: (count, *shape) float32 on the CPU."""
    out = torch.empty((count, *shape))
    for k in range(count):
        g = torch.Generator().manual_seed(derived_seed("neuromf-sample", seed, start + k))
        out[k] = torch.randn(tuple(shape), generator=g)
    return out


def generate_batches(
    spec: RunSpec,
    net: nn.Module,
    n: int,
    nfes: Sequence[int],
    seed: int,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """Yield (start, {nfe: NORMALISED latents (b, C, D, H, W) float32 on `device`}) for n samples in batches."""
    from neuromf.meanflow.sampler import sample_for_run

    shape = (spec.model.in_channels, *spec.model.spatial_size)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        noise = sample_noise(seed, start, count, shape).to(device)
        yield start, {nfe: sample_for_run(spec, net, noise, nfe) for nfe in nfes}
