"""MeanFlow sampling (t = 1 is noise, t = 0 is data): the one sampler of training, `neuromf sample` and `evaluate`.

One step with x-prediction is ONE network call, z0_hat = net(e, t = 1, h = 1): the network
output is the sample (no u -> x conversion; with u-prediction, z0 = e - u). Several steps walk
a uniform grid 1 = t_0 > t_1 > ... > t_n = 0 with z_r = z_t - (t - r) u(z_t, t, h = t - r),
u = (z_t - x_hat) / max(t, denominator_floor) for x-prediction, the floor the run trained with.
The sampler runs under no_grad, leaves the module's train/eval mode alone, works with online or
EMA weights alike and is deterministic given the noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neuromf.device import autocast_dtype
from neuromf.spec.schema import RunSpec

__all__ = ["sample", "sample_for_run"]

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _call(net: Net, z: torch.Tensor, t: float, h: float, dtype: torch.dtype | None) -> torch.Tensor:
    """net(z, t, h) for scalar t, h broadcast to the batch; output in z's dtype."""
    tt = torch.full((z.shape[0],), t, dtype=z.dtype, device=z.device)
    hh = torch.full((z.shape[0],), h, dtype=z.dtype, device=z.device)
    with torch.autocast(z.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = net(z, tt, hh)
    return out.to(z.dtype)


def _walk(
    net: Net, noise: torch.Tensor, nfe: int, prediction_type: str, floor: float, dtype: torch.dtype | None
) -> torch.Tensor:
    """One batch from t = 1 to t = 0 in `nfe` steps."""
    z = noise.to(torch.promote_types(noise.dtype, torch.float32))
    if nfe == 1:  # exactly one call; with x-prediction its output IS the sample
        out = _call(net, z, 1.0, 1.0, dtype)
        return out if prediction_type == "x" else z - out  # z_0 = z_1 - (1 - 0) u(z_1, 1, 1)
    grid = [1.0 - k / nfe for k in range(nfe)] + [0.0]
    for t, r in zip(grid[:-1], grid[1:]):
        out = _call(net, z, t, t - r, dtype)
        u = out if prediction_type == "u" else (z - out) / max(t, floor)
        z = z - (t - r) * u
    return z


@torch.no_grad()
def sample(
    net: Net,
    noise: torch.Tensor,
    nfe: int,
    *,
    prediction_type: str = "x",
    denominator_floor: float = 0.05,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Samples from `noise` (n, C, D, H, W) in `nfe` steps, `batch_size` at a time; float32, on noise's device."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if prediction_type not in ("x", "u"):
        raise ValueError(f"prediction_type must be 'x' or 'u', got {prediction_type!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = noise.split(batch_size or max(1, noise.shape[0]))
    return torch.cat([_walk(net, e, nfe, prediction_type, denominator_floor, autocast_dtype) for e in chunks]).float()


def sample_for_run(spec: RunSpec, net: Net, noise: torch.Tensor, nfe: int) -> torch.Tensor:
    """Normalised latents as the run `spec` makes them: its prediction type and meanflow.denominator_floor, its
    precision on noise's device, its micro-batch size. What periodic samples, `neuromf sample` and `evaluate` call."""
    return sample(
        net,
        noise,
        nfe,
        prediction_type=spec.model.prediction_type,
        denominator_floor=spec.meanflow.denominator_floor,
        autocast_dtype=autocast_dtype(spec, noise.device),
        batch_size=spec.training.micro_batch_size,
    )
